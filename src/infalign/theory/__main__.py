"""`python -m infalign.theory`: the closed-form analysis from the command line (Hydra, `conf/theory.yaml`).

    python -m infalign.theory transform=bon_exp transform.t=4 beta=0.1 n=4
        -> last line of stdout: {"kl": ..., "win_rate": ..., "bon_win_rate": ..., "won_win_rate": ...}
    python -m infalign.theory mode=curve curve.ns=[2,4]
        -> win_rate_curves.csv and win_rate_curves.png in the Hydra run directory
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from infalign.core.checks import check_beta, check_n
from infalign.runtime.atomic import atomic_write_csv, atomic_write_figure
from infalign.runtime.paths import conf_dir
from infalign.theory import analyze, win_rate_curves

log = logging.getLogger(__name__)


def write_curves(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """Write curve rows as CSV and a PNG (BoN and WoN win rate vs KL, one column per N); atomic writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "win_rate_curves.csv", out_dir / "win_rate_curves.png"
    atomic_write_csv(csv_path, rows, list(rows[0]))

    ns = sorted({r["n"] for r in rows})
    names = list(dict.fromkeys(r["transform"] for r in rows))
    fig, axes = plt.subplots(2, len(ns), figsize=(3.6 * len(ns), 6.4), squeeze=False, sharex=True)
    for col, n in enumerate(ns):
        for row, (key, label) in enumerate((("bon_win_rate", "best-of-N"), ("won_win_rate", "worst-of-N"))):
            ax = axes[row][col]
            for name in names:
                pts = sorted((r["kl"], r[key]) for r in rows if r["transform"] == name and r["n"] == n)
                style = {"color": "k", "linestyle": "--" if name.endswith("bon") else ":"} if name.startswith("optimal") else {}
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
            ax.set_title(f"{label} win rate, N={n}")
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("KL(pi || pi_ref) [nats]")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write_figure(png_path, fig, dpi=110)
    finally:
        plt.close(fig)
    return csv_path, png_path


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="theory")
def main(cfg: DictConfig) -> dict | None:
    if cfg.mode == "point":
        transform = instantiate(cfg.transform)
        result = analyze(transform, check_beta(cfg.beta), check_n(cfg.n))
        print(json.dumps(result))
        return result
    if cfg.mode == "curve":
        c = cfg.curve
        betas = np.geomspace(check_beta(c.beta_min), check_beta(c.beta_max), int(c.points)).tolist()
        transforms = {name: instantiate(t) for name, t in c.transforms.items()}
        rows = win_rate_curves(transforms, list(c.ns), betas, include_optimal=bool(c.include_optimal))
        csv_path, png_path = write_curves(rows, Path(HydraConfig.get().runtime.output_dir))
        log.info("wrote %s and %s", csv_path, png_path)
        print(json.dumps({"csv": str(csv_path), "png": str(png_path), "rows": len(rows)}))
        return None
    raise ValueError(f"mode must be 'point' or 'curve', got {cfg.mode!r}")


if __name__ == "__main__":
    main()
