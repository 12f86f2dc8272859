"""Train a policy with CTRL (calibrate-and-transform RL) for best-of-N / worst-of-N inference.

    python train.py transform=bon_exp n=4
    python train.py scale=smoke                        (the seconds-sized scale, conf/scale/)
    python train.py method=won_exp scale=smoke         (a method preset, conf/method/, at that scale)
    python train.py -m transform=bon_exp,identity n=2,4 beta=0.05,0.2
"""

from infalign.runtime.allocator import tune_malloc

# First, before any large tensor: glibc keeps freed large blocks for reuse instead of handing them back to
# the kernel and faulting them in again every iteration (docs/benchmarks.md, section 3: kernel time per RL
# iteration 0.88 -> 0.30 s on the benchmark setting; TRL's iteration costs 1.3x less CPU with the same setting).
# INFALIGN_MALLOC_TUNING=0 turns it off; MALLOC_*_ variables or GLIBC_TUNABLES set by the user take precedence.
tune_malloc()

import sys  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from infalign.config import ConfigError, exit_on_user_error  # noqa: E402 (stdlib + omegaconf)
from infalign.config.check import check_config, moved_keys, report  # noqa: E402 (stdlib + omegaconf)
from infalign.runtime.errors import UserError  # noqa: E402 (stdlib)
from infalign.runtime.paths import conf_dir  # noqa: E402
from infalign.runtime.sweeper import refuse_study_without_multirun  # noqa: E402 (hydra, omegaconf)


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        # Every key first, once, in milliseconds: importing torch and Lightning (below) takes ~10 s, building the
        # models minutes. A sweep (-m) checked every member before the first one started (infalign.runtime.sweeper).
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        refuse_study_without_multirun(hydra_cfg.runtime.choices, hydra_cfg.overrides.task, multirun)
        report(check_config(cfg, hydra_cfg.runtime.choices, multirun=multirun))
        from infalign.trainer.run import run  # torch, Lightning: only for a config that passed

        final = run(cfg)  # its own checks (those that need torch or the model) raise ConfigError too
    except UserError as e:  # a refused value, a full disk: one line, exit status 2 (traceback: HYDRA_FULL_ERROR=1)
        exit_on_user_error(e)
    return final.get(f"eval/bon_win_rate@{cfg.n}")


if __name__ == "__main__":
    try:
        moved_keys(sys.argv[1:])  # calibration.train_prompts=... (now data.train_prompts): one line, before Hydra
    except ConfigError as e:
        exit_on_user_error(e)
    main()
