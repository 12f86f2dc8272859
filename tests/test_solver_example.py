"""docs/solvers.md's worked example, as the page shows it: its solver file and its YAML, taken from the page, train
a smoke run (one file + one YAML, nothing else changed); and the solver interface on its own."""

import json
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["scale=smoke", "progress=false", "logger=none", "num_threads=1", "eval.every=0"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "docs" / "solvers.md").read_text(), flags=re.S)


def _write_example(root: Path) -> None:
    (code,) = [b for b in _blocks("python") if b.startswith("# my_solvers/best_of_k.py")]
    (yaml,) = [b for b in _blocks("yaml") if "my_solvers.best_of_k.BestOfK" in b]
    (root / "my_solvers").mkdir(parents=True)
    (root / "my_solvers" / "best_of_k.py").write_text(code)
    (root / "conf" / "solver").mkdir(parents=True)
    (root / "conf" / "solver" / "best_of_k.yaml").write_text(yaml)


def test_the_docs_example_solver_trains_a_smoke_run(session_cache, tmp_path, monkeypatch):
    """In process: the config check and the run `PYTHONPATH=<tmp> python train.py ... solver=best_of_k
    hydra.searchpath=[file://<tmp>/conf]` makes (the folder on sys.path, as PYTHONPATH puts it there)."""
    from infalign.trainer.inprocess import run_in_process

    _write_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    run_in_process([*SMOKE, "solver=best_of_k", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                    f"cache_root={session_cache}"], run_dir)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["solver"] == "best_of_k" and final["iteration"] == 3
    rows = [r for r in (run_dir / "logs" / "metrics.csv").read_text().splitlines()[1:] if r]
    assert rows  # it logged its iterations


def test_the_example_advantage_credits_only_the_best_sample(tmp_path, monkeypatch):
    _write_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_solvers.best_of_k import BestOfK

    from infalign.trainer.rollout import RolloutBuffer

    solver = BestOfK(beta=0.0, k=3, minibatch_size=3, prompts_per_iteration=1)
    buffer = RolloutBuffer(rollout=None, stats={}, prompts=1, group=3, rewards=torch.tensor([[0.2, 0.9, 0.5]]).double(),
                           kl={"k1": torch.zeros(3)})
    _, adv = solver.advantages(buffer, 0.0)
    assert torch.allclose(adv, torch.tensor([-0.4 / 3, 0.8 / 3, -0.4 / 3]))  # 0.9 adds 0.4 over 0.5; centred


def test_stages_run_their_solvers_in_order_and_count_their_steps():
    from infalign.trainer.solvers import RLOO, Distill, Stages

    distill = Distill(beta=0.1, samples_per_prompt=4, minibatch_size=8, prompts_per_iteration=4)
    rl = RLOO(beta=0.1, k=4, minibatch_size=8, prompts_per_iteration=4, algo="ppo", ppo_epochs=2)
    stages = Stages([{"iterations": 2, "solver": distill}, {"iterations": None, "solver": rl}])
    assert [stages.experience(i).kind for i in range(4)] == ["pool", "pool", "rollout", "rollout"]
    assert stages.optimizer_steps(4) == 2 * (16 // 8) + 2 * 2 * (16 // 8)
