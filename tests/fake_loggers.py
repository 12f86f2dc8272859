"""Loggers that break mid-run, like W&B losing its connection, or kill the run at a chosen point.

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


class KillingLogger(FailingLogger):
    """SIGKILLs its own process at a chosen point of a run, like the OOM killer or a power cut would:

    - `kill_at=eval:<k>`: when the k-th evaluation logs its metrics (the CSV logger has buffered them, and
      eval_metrics.csv has no row for it yet): with k the number of the final evaluation, a kill during it;
    - `kill_at=finalize`: when Lightning finalizes the loggers, after the final evaluation and the final
      checkpoint, before policy/ and final_metrics.json are written.

    python train.py logger=none +logger._target_=tests.fake_loggers.KillingLogger +logger.kill_at=eval:3
    """

    def __init__(self, kill_at: str = "finalize", **_ignored):
        super().__init__(fail_after=10**9)
        self.kill_at, self.evals = str(kill_at), 0

    def _kill(self):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("eval/") for k in metrics):
            self.evals += 1
            if self.kill_at == f"eval:{self.evals}":
                self._kill()

    def finalize(self, status):
        if self.kill_at == "finalize":
            self._kill()


class WaitingLogger(FailingLogger):
    """Holds the run at its first logged metrics until the file `until` exists (at most `timeout` seconds): a run
    that is surely still going while a test starts a second command beside it."""

    def __init__(self, until: str, timeout: float = 300, **_ignored):
        super().__init__(fail_after=10**9)
        self.until, self.timeout, self.waited = until, float(timeout), False

    def log_metrics(self, metrics, step=None):
        import os
        import time

        deadline = time.time() + self.timeout
        while not self.waited and not os.path.exists(self.until) and time.time() < deadline:
            time.sleep(0.05)
        self.waited = True
