"""The trainer: the LightningModule (policy, reference, reward model, calibrator, transform, solver), the DataModule
that builds each iteration's experience (`experience.RolloutBuilder`), the solvers (`solvers/`), the calibration
cache, evaluation and checkpoint callbacks, and `run` (what `python train.py` does)."""
