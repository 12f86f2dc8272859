"""Train a policy with CTRL (calibrate-and-transform RL) for best-of-N / worst-of-N inference.

    python train.py transform=bon_exp n=4
    python train.py experiment=smoke
    python train.py -m transform=bon_exp,identity n=2,4 beta=0.05,0.2
"""

import hydra
from omegaconf import DictConfig

from infalign.paths import conf_dir


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from infalign.run import run  # imported here so `--help` and `--cfg job` stay fast

    final = run(cfg)
    return final.get(f"eval/bon_win_rate@{cfg.n}")


if __name__ == "__main__":
    main()
