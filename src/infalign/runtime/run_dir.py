"""One command per run directory, and no file changed by a command that does not run there.

`hold_run_dir` locks a run (or sweep) directory for the rest of the process: a second command aimed at it is
refused in one line before it writes anything. `SweepDirLock` (a Hydra callback) takes the sweep directory's lock
before Hydra writes `multirun.yaml` there. `accept_run` marks the command as the one that trains there: only then
are Hydra's record of it (`.hydra/*.yaml`; conf/train.yaml sets `hydra.output_subdir: null`) and `train.log`
written. Stdlib, omegaconf and Hydra only: used before torch is imported.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from infalign.runtime.atomic import atomic_write_text
from infalign.runtime.errors import ConfigError, exit_on_user_error
from infalign.runtime.log_files import open_run_logs

log = logging.getLogger(__name__)

__all__ = ["HYDRA_DIR", "RunDirBusy", "SweepDirLock", "accept_run", "hold_run_dir", "is_first_process"]

HYDRA_DIR = ".hydra"  # Hydra's usual place for its record of the command; written by accept_run
_held: dict[Path, int] = {}  # directory -> the descriptor whose flock this process holds

# set by Lightning's launcher in the processes it starts, and by torchrun / srun / jsrun in every process
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_first_process() -> bool:
    """True unless the environment marks this as a non-zero rank of a distributed run (no process group yet).

    Not Lightning's `rank_zero._get_rank()` (2.6), which ignores NODE_RANK: before its launcher starts the
    processes, the main process of node 1 (only NODE_RANK=1 set) would count as rank 0 and clear a shared run
    directory; nor `rank_zero_only.rank`, which is that value as of Lightning's import, not the environment now.
    """
    return all(os.environ.get(k, "0") in ("", "0") for k in _RANK_VARIABLES)


class RunDirBusy(ConfigError):
    """Another command holds the directory."""


def hold_run_dir(directory: str | Path) -> None:
    """Lock `directory` (created if missing) for the rest of this process, or raise `RunDirBusy`.

    flock(2) on the directory's own descriptor, not the `filelock` package: its lock file would itself be a change
    to the run directory, which a refused command must not make. The kernel drops the lock when the process ends,
    however it ends (SIGKILL included), so a dead run never leaves its directory locked. Other processes of this
    run's distributed group (ranks > 0) share the first process's directory and take no lock."""
    directory = Path(directory).resolve()
    if directory in _held or not is_first_process():
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunDirBusy(f"{directory} is in use by another command still running there (a run or a sweep): "
                             "wait until it ends, or choose another hydra.run.dir / hydra.sweep.dir") from None
        # a file system without flock on directories (some network mounts): say so, run unprotected
        log.warning("cannot lock %s (%s): nothing stops a second command from writing into it at the same time",
                    directory, os.strerror(e.errno))
        return
    _held[directory] = fd


def accept_run(run_dir: str | Path, cfg: DictConfig) -> None:
    """This command trains in `run_dir`: write Hydra's record of it (as Hydra would have at the start, atomically)
    and let `train.log` receive its lines (held in memory until now)."""
    if is_first_process():
        hydra_cfg = HydraConfig.get()
        out = Path(run_dir) / HYDRA_DIR
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write_text(out / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
        atomic_write_text(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
    open_run_logs()


class SweepDirLock(Callback):
    """Holds `hydra.sweep.dir` for the whole multirun, from before Hydra writes `multirun.yaml` there: a second
    sweep into the same directory is refused in one line (exit status 2) and changes nothing."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            hold_run_dir(config.hydra.sweep.dir)
        except ConfigError as e:
            exit_on_user_error(e)
