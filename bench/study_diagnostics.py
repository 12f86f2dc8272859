"""Where a study's gap to theory comes from: in-sample vs held-out, and KL the theory would spend.

For every method x beta of a finished study sweep (mean over seeds):
  theory KL       the KL the optimal policy for the run's transform spends at the run's beta (closed form;
                  raw: none), against the KL the run actually measured on held-out prompts;
  theory std      that policy's standard win rate;
  train std       the calibrated reward of the training rollouts over the last 3 iterations = the standard
                  win rate on training prompts (on-policy samples before each update);
  eval std        the standard win rate on the held-out prompts;
  train KL        k1 KL of the training rollouts over the last 3 iterations.

    python bench/study_diagnostics.py outputs/multirun/<time>_study_compact
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from infalign.study.run_config import transform_from_run
from infalign.study.runs import collect_runs, logged_values
from infalign.theory import analyze


def last_mean(member: Path, column: str, last: int = 3) -> float:
    return float(np.mean(logged_values(member, column)[-last:]))


def main(sweep_dir: str) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for final in collect_runs(Path(sweep_dir)):
        member = Path(sweep_dir) / final["member"]
        row = {"eval_kl": final["eval/kl"], "eval_std": final["eval/bon_win_rate@1"],
               "train_kl": last_mean(member, "train/kl/k1"), "train_std": last_mean(member, "train/reward/calibrated")}
        transform = transform_from_run(final, member)
        if transform is None:  # raw: its "calibrated" column is the raw score (pass-through calibrator)
            row["train_std"] = np.nan
        theory = analyze(transform, final["beta"], final["n"]) if transform is not None else {}
        row["theory_kl"], row["theory_std"] = theory.get("kl", np.nan), theory.get("win_rate", np.nan)
        groups[(final["method"], final["beta"])].append(row)
    cols = ["theory_kl", "train_kl", "eval_kl", "theory_std", "train_std", "eval_std"]
    print("| method | beta | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for (method, beta), rows in groups.items():
        cells = [f"{np.mean([r[c] for r in rows]):.3f}" for c in cols]
        print(f"| {method} | {beta:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
