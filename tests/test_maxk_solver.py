"""solver=maxk (infalign.trainer.solvers.maxk): the best-of-N win rate's own gradient trains in the trainer, with
either KL; its advantages are core.maxk's on the buffer's raw and reference rewards; bad combinations refused."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from infalign.core.maxk import maxk_advantages, win_value
from infalign.trainer.solvers import MaxK

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["scale=smoke", "progress=false", "logger=none", "num_threads=1", "eval.every=0"]


@pytest.mark.parametrize("extra", [[], ["rl.kl_penalty=exact", "solver.mode=won"]])
def test_maxk_trains_a_smoke_run(session_cache, tmp_path, extra):
    from infalign.trainer.inprocess import run_in_process

    run_dir = tmp_path / "run"  # in process: the config check and the run `python train.py` makes
    run_in_process([*SMOKE, "solver=maxk", "n=4", *extra, f"cache_root={session_cache}"], run_dir)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["solver"] == "maxk" and final["iteration"] == 3 and final["eval/kl"] > 0
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    mode = "won" if "solver.mode=won" in extra else "bon"
    assert f"train/reward/maxk_{mode}_win_rate" in header  # the estimator's own win rate, per iteration
    assert final["metric"] == mode  # what the run was built for: the solver's mode, not the unused transform's


def test_maxk_advantages_are_the_estimators_on_the_buffers_rewards():
    g = torch.Generator().manual_seed(0)
    raw, ref = torch.randn(3, 5, generator=g).double(), torch.randn(3, 8, generator=g).double()
    k1 = torch.rand(15, generator=g).double()
    buffer = SimpleNamespace(prompts=3, raw_rewards=raw.flatten(), reference_rewards=ref, kl={"k1": k1}, stats={})
    solver = MaxK(n=4, beta=0.1, k=5, minibatch_size=5, prompts_per_iteration=3)
    _, adv = solver.advantages(buffer, 0.1)
    want = maxk_advantages(win_value(raw, ref, 4, "bon"), 4, "bon", baseline="loo", k1=k1.view(3, 5), beta=0.1)
    torch.testing.assert_close(adv, want.flatten().float())
    assert solver.baseline == "loo"  # k >= N+1: the zero-sum leave-one-out baseline; k = N: PKPO's loo-1
    assert MaxK(n=4, beta=0.1, k=4, minibatch_size=4, prompts_per_iteration=1).baseline == "loo_minus_one"


@pytest.mark.parametrize("overrides, says", [
    (["n=8"], "rl.k=4 is below n=8: solver=maxk"),
    (["method=raw"], "solver=maxk .* needs calibrator=empirical"),
])
def test_maxk_refuses_what_it_cannot_estimate(overrides, says, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "train.py"), *SMOKE, "solver=maxk", *overrides,
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and __import__("re").search(says, last), last
