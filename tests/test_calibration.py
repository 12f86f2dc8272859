import numpy as np
import pytest
import torch

from infalign.core.calibration import EmpiricalCalibrator, PassThroughCalibrator


def brute_force(a, b):
    return np.array([[(np.sum(bj < x) + 0.5 * np.sum(bj == x)) / len(bj) for x in ai] for ai, bj in zip(a, b)])


def test_matches_definition_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(7, 6)).astype(float)  # small integer range: many ties
    b = rng.integers(0, 5, size=(7, 9)).astype(float)
    out = EmpiricalCalibrator()(torch.tensor(a), torch.tensor(b))
    np.testing.assert_allclose(out.numpy(), brute_force(a, b))
    assert out.dtype == torch.float64


def test_numpy_in_numpy_out_and_float32_kept():
    a, b = np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]])
    np.testing.assert_allclose(EmpiricalCalibrator()(a, b), [[0.0, 1.0]])
    out = EmpiricalCalibrator()(torch.tensor([[0.5]], dtype=torch.float32), torch.tensor([[0.5, 1.0]]))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(0.25)


def test_reference_samples_calibrate_to_uniform():
    torch.manual_seed(0)
    ref = torch.randn(200, 64) * 3 + 7  # any scale
    fresh = torch.randn(200, 64) * 3 + 7  # new draws from the same reference distribution
    c = EmpiricalCalibrator()(fresh, ref).flatten()
    assert c.min() >= 0 and c.max() <= 1
    hist = torch.histc(c, bins=4, min=0, max=1) / c.numel()
    assert torch.allclose(hist, torch.full((4,), 0.25), atol=0.02), hist
    # a sample's calibration against its own reference set is uniform on {1/2M, 3/2M, ...}
    self_c = EmpiricalCalibrator()(ref, ref)
    assert torch.allclose(self_c.sort(dim=1).values[0], (torch.arange(64) + 0.5) / 64)


def test_invariant_to_increasing_map():
    torch.manual_seed(1)
    a, b = torch.randn(5, 8), torch.randn(5, 16)
    cal = EmpiricalCalibrator()
    for f in (torch.exp, lambda x: 3 * x - 2, lambda x: x**3, torch.sigmoid):
        assert torch.equal(cal(a, b), cal(f(a), f(b)))


def test_prompts_do_not_mix():
    a = torch.tensor([[0.0], [0.0]])
    b = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    assert EmpiricalCalibrator()(a, b).flatten().tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.zeros(3, 4), torch.zeros(2, 4), "same prompts"),
        (torch.zeros(3, 4), torch.zeros(3, 0), "M >= 1"),
        (torch.zeros(4), torch.zeros(4), "2-D"),
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 3), "policy_rewards holds 1 non-finite"),
        (torch.zeros(1, 2), torch.tensor([[0.0, float("inf")]]), "reference_rewards holds 1 non-finite"),
    ],
)
def test_bad_input_is_rejected(a, b, match):
    with pytest.raises(ValueError, match=match):
        EmpiricalCalibrator()(a, b)


def test_passthrough_returns_raw_rewards_and_checks_them():
    a = torch.randn(3, 4)
    assert PassThroughCalibrator()(a, torch.zeros(3, 2)) is a
    assert not PassThroughCalibrator.needs_reference
    with pytest.raises(ValueError, match="non-finite"):
        PassThroughCalibrator()(torch.tensor([[float("nan")]]))
