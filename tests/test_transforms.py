import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from infalign.core.transforms import (
    BoNExpTransform,
    IdentityTransform,
    LogTransform,
    OptimalTransform,
    RawTransform,
    WoNExpTransform,
)
from infalign.theory import factories

CONF = Path(__file__).resolve().parents[1] / "conf"
U = np.linspace(0.0, 1.0, 101)


@pytest.mark.parametrize("t", [0.5, 4.0, 30.0])
def test_exp_family_matches_paper_forms(t):
    naive_bon = (np.exp(t * U) - 1) / (np.exp(t) - 1)
    naive_won = (1 - np.exp(-t * U)) / (1 - np.exp(-t))
    np.testing.assert_allclose(BoNExpTransform(t)(U), naive_bon, atol=1e-12)
    np.testing.assert_allclose(WoNExpTransform(t)(U), naive_won, atol=1e-12)


@pytest.mark.parametrize("transform", [BoNExpTransform(3.0), WoNExpTransform(3.0), IdentityTransform(), LogTransform(),
                                       LogTransform(m=16)])
def test_torch_and_numpy_agree(transform):
    out_np = transform(U)
    out_t = transform(torch.tensor(U))
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out_np, atol=1e-12)
    assert transform(torch.tensor(U, dtype=torch.float32)).dtype == torch.float32


@pytest.mark.parametrize("cls", [BoNExpTransform, WoNExpTransform])
@pytest.mark.parametrize("t", [1e-3, 1.0, 1e3, 1e6])
def test_exp_family_normalised_monotone_and_finite_for_any_t(cls, t):
    phi = cls(t)(U)
    assert np.all(np.isfinite(phi))
    assert phi[0] == pytest.approx(0.0, abs=1e-12) and phi[-1] == pytest.approx(1.0)
    assert np.all(np.diff(phi) >= 0)


def test_log_without_m_floors_continuous_inputs():
    assert LogTransform(eps=1e-3)(np.array([0.0]))[0] == pytest.approx(math.log(1e-3))
    assert torch.isfinite(LogTransform()(torch.zeros(3))).all()
    assert LogTransform()(np.array([0.5]))[0] == pytest.approx(math.log(0.5))


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_log_with_m_reads_ranks_as_mid_ranks(m):
    """b/M -> (b + 1/2)/(M + 1): finite at both ends, evenly spaced ranks, a calibrated 0 no outlier."""
    b = np.arange(m + 1)
    phi = LogTransform(m=m)(b / m)
    np.testing.assert_allclose(phi, np.log((b + 0.5) / (m + 1)), rtol=1e-12)
    assert np.all(np.isfinite(phi)) and np.all(phi < 0) and np.all(np.diff(phi) > 0)
    if m >= 2:  # the gap from rank 0 to rank 1 is log 3, whatever M: not the floor's log(1/(M eps))
        assert phi[1] - phi[0] == pytest.approx(math.log(3.0))
    half_ties = LogTransform(m=m)((b[:-1] + 0.5) / m)  # a tie with one cache sample counts half
    assert np.all((half_ties > phi[:-1]) & (half_ties < phi[1:]))
    np.testing.assert_allclose(LogTransform(m=m)(torch.tensor(b / m)).numpy(), phi, rtol=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_log_m_must_be_a_positive_integer(bad):
    with pytest.raises((ValueError, TypeError), match="m"):
        LogTransform(m=bad)


def test_raw_accepts_any_real_reward_but_calibrated_transforms_do_not():
    r = torch.tensor([-3.0, 12.0])
    assert torch.equal(RawTransform()(r), r)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        IdentityTransform()(r)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "abc"])
def test_t_must_be_positive(bad):
    with pytest.raises(ValueError, match="`t` must be a positive"):
        BoNExpTransform(t=bad)


def test_nan_input_rejected():
    with pytest.raises(ValueError, match="NaN"):
        WoNExpTransform(2.0)(torch.tensor([0.1, float("nan")]))


def test_optimal_transform_interpolates_its_table_in_torch_and_numpy():
    opt = factories.optimal(n=4, mode="bon", beta=0.2)
    assert isinstance(opt, OptimalTransform)
    u = np.random.default_rng(0).random(50)
    np.testing.assert_allclose(opt(torch.tensor(u)).numpy(), opt(u), atol=1e-10)
    assert np.all(np.diff(opt(U)) >= 0)  # best-of-N rewards higher u
    # N = 1: the optimum is the identity (the standard win rate's functional derivative is u)
    np.testing.assert_allclose(factories.optimal(n=1, mode="bon", beta=0.3)(U), U, atol=1e-9)


def test_every_transform_config_instantiates():
    names = sorted(p.stem for p in (CONF / "transform").glob("*.yaml"))
    assert {"raw", "identity", "bon_exp", "won_exp", "log", "optimal"} <= set(names)
    for name in names:
        cfg = OmegaConf.create({"n": 2, "beta": 0.5, "calibration": {"m": 16},
                                "transform": OmegaConf.load(CONF / "transform" / f"{name}.yaml")})
        transform = instantiate(cfg.transform)
        assert np.all(np.isfinite(transform(U)))
        if name == "log":  # the calibration's M reaches the transform
            assert transform.m == 16


def test_auto_t_is_the_theory_best_t_at_the_optimums_kl():
    from infalign import theory

    auto = factories.bon_exp(t="auto", n=4, beta=0.2)
    want = theory.best_t("bon", 4, theory.optimal_density(4, "bon", 0.2).kl())["t"]
    assert isinstance(auto, BoNExpTransform) and auto.auto and auto.t == pytest.approx(want)
    won = factories.won_exp(t="auto", n=4, target_kl=0.5)
    assert isinstance(won, WoNExpTransform) and won.t == pytest.approx(theory.best_t("won", 4, 0.5)["t"])
    with pytest.raises(ValueError, match="t=auto needs n"):
        factories.bon_exp(t="auto")
    with pytest.raises(ValueError, match="target_kl"):
        factories.won_exp(t="auto", n=4, target_kl=-1)


def test_a_fixed_t_runs_no_solver(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the solver ran for a fixed t")

    monkeypatch.setattr(factories, "best_t", boom)
    monkeypatch.setattr(factories, "optimal_density", boom)
    fixed = factories.bon_exp(t=10.0, n=4, beta=0.05)
    assert fixed.t == 10.0 and not fixed.auto
    with pytest.raises(TypeError):  # the transform itself takes no solver arguments: t=auto lives in the factory
        BoNExpTransform(t="auto", n=4, beta=0.2)
