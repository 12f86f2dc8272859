"""`python -m infalign.theory`: the closed-form analysis from the command line (Hydra, `conf/theory.yaml`).

    python -m infalign.theory transform=bon_exp transform.t=4 beta=0.1 n=4
        -> last line of stdout: {"kl": ..., "win_rate": ..., "bon_win_rate": ..., "won_win_rate": ...}
    python -m infalign.theory mode=curve curve.ns=[2,4]
        -> win_rate_curves.csv and win_rate_curves.png in the Hydra run directory

Every `transform=` option runs with its defaults (`raw` is refused: the closed forms need a calibrated reward);
a refused value is one line `error: ...`, exit status 2 (the traceback with HYDRA_FULL_ERROR=1). `--help` lists
the options this CLI reads (conf/theory.yaml's `hydra.help`), not the trainer's groups that share `conf/`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from infalign.core.checks import check_beta, check_n
from infalign.runtime.atomic import atomic_write_csv, atomic_write_figure
from infalign.runtime.errors import ConfigError, exit_on_user_error
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


def _transform(name: str, node):
    """A transform the closed forms can analyse, from its config node; a config that cannot build one, or the raw
    transform (the theory is for a calibrated reward), is refused as ConfigError."""
    try:
        transform = instantiate(node)
    except Exception as e:  # noqa: BLE001 - Hydra wraps the transform's own refusal (t=-1, ...) or a missing key
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        raise ConfigError(f"{name}: {str(cause).splitlines()[0]}") from e
    if not transform.needs_calibration:
        raise ConfigError(f"{name}: the raw transform has no model-agnostic analysis (the closed forms need a calibrated "
                          "reward); choose transform=identity, bon_exp, won_exp, log or optimal")
    return transform


def _user_value(check, value):
    try:
        return check(value)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def run_theory(cfg: DictConfig) -> dict | None:
    """The CLI's work on its composed config; a bad value raises ConfigError (one line naming the key)."""
    if cfg.mode == "point":
        transform = _transform(f"transform={HydraConfig.get().runtime.choices.get('transform')}"
                               if HydraConfig.initialized() else "transform", cfg.transform)
        result = analyze(transform, _user_value(check_beta, cfg.beta), _user_value(check_n, cfg.n))
        print(json.dumps(result))
        return result
    if cfg.mode == "curve":
        c = cfg.curve
        betas = np.geomspace(_user_value(check_beta, c.beta_min), _user_value(check_beta, c.beta_max),
                             int(c.points)).tolist()
        transforms = {name: _transform(f"curve.transforms.{name}", t) for name, t in c.transforms.items()}
        ns = [_user_value(check_n, n) for n in c.ns]
        rows = win_rate_curves(transforms, ns, betas, include_optimal=bool(c.include_optimal))
        csv_path, png_path = write_curves(rows, Path(HydraConfig.get().runtime.output_dir))
        log.info("wrote %s and %s", csv_path, png_path)
        print(json.dumps({"csv": str(csv_path), "png": str(png_path), "rows": len(rows)}))
        return None
    raise ConfigError(f"mode must be 'point' or 'curve', got {cfg.mode!r}; e.g. mode=curve")


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="theory")
def main(cfg: DictConfig) -> dict | None:
    try:
        return run_theory(cfg)
    except ConfigError as e:  # one line `error: ...`, exit status 2 (the traceback with HYDRA_FULL_ERROR=1)
        exit_on_user_error(e)


if __name__ == "__main__":
    main()
