"""The trainer: the LightningModule that owns the RL iteration, the prompt datamodule, the calibration cache,
evaluation and checkpoint callbacks, and `run` (what `python train.py` does)."""
