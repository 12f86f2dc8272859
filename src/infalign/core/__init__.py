"""The method's math: calibration, transforms (Phi), losses, win-rate metrics. Pure torch/numpy, no Lightning;
imports nothing of infalign outside this package."""
