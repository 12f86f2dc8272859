"""The KL in calibrated space (`eval/kl_calibrated`) and the per-prompt evaluation table (eval_per_prompt.csv):
closed-form cases, ties, the data-processing bound, and the sum across processes (two gloo processes)."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from infalign.trainer.evaluation import CalibratedRankKL, PerPromptTable, calibrated_rank_histogram, rank_kl

M = 16


def gaussian_prompts(prompts: int, k: int, shift: float = 0.0, seed: int = 0):
    """Per prompt its own reward scale; policy rewards `shift` standard deviations above the reference's."""
    g = torch.Generator().manual_seed(seed)
    centre = 3.0 * torch.randn(prompts, 1, generator=g, dtype=torch.float64)
    ref = centre + torch.randn(prompts, M, generator=g, dtype=torch.float64)
    policy = centre + shift + torch.randn(prompts, k, generator=g, dtype=torch.float64)
    return policy, ref


def test_histogram_counts_ranks_and_spreads_ties():
    ref = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    policy = torch.tensor([[0.0, 1.5, 2.0, 9.0]])  # ranks 0, 1, {1, 2, 3} (tied with two), 4
    h = calibrated_rank_histogram(policy, ref)
    assert h.tolist() == pytest.approx([1.0, 1.0 + 1 / 3, 1 / 3, 1 / 3, 1.0]) and h.sum() == pytest.approx(4.0)


def test_policy_equal_to_the_reference_gives_about_zero():
    policy, ref = gaussian_prompts(3000, 8)
    metric = CalibratedRankKL(M)
    metric.update(policy, ref)
    kl = metric.compute().item()
    plugin = rank_kl(metric.counts, miller_madow=False).item()
    assert abs(kl) < 1e-3 and plugin > kl + 3e-4  # the corrections remove the plug-in's upward bias


def test_the_fixed_calibration_sets_bias_is_removed_with_few_prompts():
    """48 prompts (the default eval size): without the calibration-set term the mean would be ~0.009 nats."""
    kls = [CalibratedRankKL(M)(*gaussian_prompts(48, 16, seed=s)).item() for s in range(200)]
    assert abs(sum(kls) / len(kls)) < 2e-3


def test_ties_everywhere_still_give_about_zero():
    """Rewards on 4 values only (most samples tied): the random tie-break keeps the reference's ranks uniform."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randint(0, 4, (3000, M), generator=g).double()
    policy = torch.randint(0, 4, (3000, 8), generator=g).double()
    assert abs(CalibratedRankKL(M)(policy, ref).item()) < 2e-3


def test_policy_beating_every_reference_sample_gives_log_m_plus_one():
    policy, ref = gaussian_prompts(50, 8)
    policy = ref.max(dim=1, keepdim=True).values + 1.0 + policy.abs()
    expected = math.log(M + 1) - M / (2 * (M + 2) * 50)  # one bin: no Miller-Madow term, the calibration-set term
    assert CalibratedRankKL(M)(policy, ref).item() == pytest.approx(expected, abs=1e-12)
    assert CalibratedRankKL(M)(ref.min(dim=1, keepdim=True).values - 1.0 - policy.abs(), ref).item() == \
        pytest.approx(expected, abs=1e-12)
    assert rank_kl(calibrated_rank_histogram(policy, ref), miller_madow=False).item() == pytest.approx(math.log(M + 1))


def test_miller_madow_correction_by_hand():
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])  # 4 samples, 2 bins with mass, uniform over 4
    plugin = 0.75 * math.log(0.75 * 4) + 0.25 * math.log(0.25 * 4)
    assert rank_kl(counts, miller_madow=False).item() == pytest.approx(plugin)
    assert rank_kl(counts).item() == pytest.approx(plugin - (2 - 1) / (2 * 4))
    assert rank_kl(counts, prompts=2).item() == pytest.approx(plugin - (2 - 1) / (2 * 4) - 3 / (2 * 5 * 2))
    assert math.isnan(rank_kl(torch.zeros(5)).item())


def test_a_lower_bound_of_the_kl_of_the_responses():
    """Responses = their rewards, Gaussian shifted by d: KL(pi || pi_ref) = d^2 / 2 bounds the calibrated KL."""
    for shift in (0.3, 1.0):
        policy, ref = gaussian_prompts(3000, 8, shift, seed=2)
        kl = CalibratedRankKL(M)(policy, ref).item()
        assert 0.5 * shift**2 * 0.6 < kl < 0.5 * shift**2  # close to the bound: the rank keeps most of it


def test_per_prompt_table_rows_and_unevaluated_prompts():
    table = PerPromptTable(4, ["a", "b"])
    table.update(torch.tensor([2, 0]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    rows, done = table.compute()
    assert done.tolist() == [True, False, True, False]
    assert rows[0].tolist() == [3.0, 4.0] and rows[2].tolist() == [1.0, 2.0] and torch.isnan(rows[1]).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        policy, ref = gaussian_prompts(40, 8, shift=0.5)
        kl, table = CalibratedRankKL(M), PerPromptTable(40, ["mean_reward"])
        mine = list(range(rank, 40, world))  # as the evaluation splits its batches
        kl.update(policy[mine], ref[mine])
        table.update(torch.tensor(mine), policy[mine].mean(1, keepdim=True))
        rows, done = table.compute()
        torch.save({"kl": kl.compute(), "rows": rows, "done": done}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_to_one(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    policy, ref = gaussian_prompts(40, 8, shift=0.5)
    expected = CalibratedRankKL(M)(policy, ref)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        assert got["kl"].item() == pytest.approx(expected.item(), abs=1e-12)
        assert bool(got["done"].all()) and torch.allclose(got["rows"][:, 0], policy.mean(1))
