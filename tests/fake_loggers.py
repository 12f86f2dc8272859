"""A logger that breaks mid-run, like W&B losing its connection.

    python train.py logger=none +logger._target_=tests.fake_loggers.FailingLogger +logger.fail_after=3

Importable as `tests.fake_loggers` by `python train.py` run from the repository root (namespace package).
"""

from lightning.pytorch.loggers import Logger


class FailingLogger(Logger):
    def __init__(self, fail_after: int = 2, **_ignored):
        super().__init__()
        self.fail_after, self.calls = int(fail_after), 0

    @property
    def name(self):
        return "failing"

    @property
    def version(self):
        return "0"

    @property
    def experiment(self):
        return self

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls += 1
        if self.calls > self.fail_after:
            raise ConnectionError("remote logging service unreachable (simulated)")
