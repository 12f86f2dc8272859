import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.integrate import quad

from infalign import theory
from infalign.core.transforms import BoNExpTransform, IdentityTransform, LogTransform, RawTransform, WoNExpTransform


def quad_reference(phi, beta, n):
    """Independent numerical integration of the math page's formulas (scipy quad, nested for F)."""
    opts = dict(epsabs=1e-12, epsrel=1e-10, limit=200)
    z = quad(lambda u: math.exp(phi(u) / beta), 0, 1, **opts)[0]
    p = lambda u: math.exp(phi(u) / beta) / z  # noqa: E731
    cdf = lambda u: quad(p, 0, u, **opts)[0]  # noqa: E731
    return {
        "kl": quad(lambda u: p(u) * math.log(p(u)), 0, 1, **opts)[0],
        "win_rate": quad(lambda u: p(u) * u, 0, 1, **opts)[0],
        "bon_win_rate": quad(lambda u: n * cdf(u) ** (n - 1) * p(u) * u**n, 0, 1, **opts)[0],
        "won_win_rate": quad(lambda u: n * (1 - cdf(u)) ** (n - 1) * p(u) * (1 - (1 - u) ** n), 0, 1, **opts)[0],
    }


@pytest.mark.parametrize(
    "transform, beta, n",
    [
        (BoNExpTransform(4.0), 0.1, 4),
        (BoNExpTransform(20.0), 0.5, 8),
        (WoNExpTransform(5.0), 0.2, 4),
        (IdentityTransform(), 0.3, 2),
        (LogTransform(1e-12), 0.25, 3),
    ],
)
def test_matches_independent_numerical_integration(transform, beta, n):
    got = theory.analyze(transform, beta, n)
    want = quad_reference(lambda u: float(transform(np.array(u))), beta, n)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key


@pytest.mark.parametrize("transform", [IdentityTransform(), BoNExpTransform(30.0), WoNExpTransform(30.0), LogTransform()])
def test_beta_to_infinity_is_the_reference(transform):
    got = theory.analyze(transform, 1e7, 4)
    assert got["kl"] == pytest.approx(0.0, abs=1e-8)
    for key in ("win_rate", "bon_win_rate", "won_win_rate"):
        assert got[key] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_log_transform_at_beta_one_over_n_minus_one_is_best_of_n(n):
    density = theory.tilted_density(LogTransform(eps=1e-12), 1.0 / (n - 1))
    assert density.kl() == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-7)
    assert density.win_rate() == pytest.approx(n / (n + 1), abs=1e-7)
    # the density is N u^(N-1): its CDF is u^N
    np.testing.assert_allclose(density.cdf, density.grid**n, atol=1e-7)
    # best-of-N of the best-of-N policy is best-of-N^2 of the reference: wins N^2/(N^2+N)
    assert density.bon_win_rate(n) == pytest.approx(n / (n + 1), abs=1e-6)


def test_agrees_with_monte_carlo_of_the_tilted_policy():
    rng = np.random.default_rng(0)
    transform, beta, n = BoNExpTransform(6.0), 0.25, 4
    # exact rejection sampling from p(u) ∝ exp(Phi(u)/beta): Phi <= 1, so accept with exp((Phi-1)/beta)
    u = rng.random(2_000_000)
    samples = u[rng.random(u.size) < np.exp((transform(u) - 1.0) / beta)]
    m = samples.size // n
    pol = samples[: m * n].reshape(m, n)
    ref = rng.random((m, n))
    draws = {
        "win_rate": pol[:, 0] > ref[:, 0],
        "bon_win_rate": pol.max(1) > ref.max(1),
        "won_win_rate": pol.min(1) > ref.min(1),
    }
    got = theory.analyze(transform, beta, n)
    for key, wins in draws.items():
        se = wins.std() / math.sqrt(wins.size)
        assert abs(got[key] - wins.mean()) < 4 * se, (key, got[key], wins.mean(), se)
    log_p = theory.tilted_density(transform, beta).log_density
    grid = theory.default_grid()
    mc_kl = np.mean(np.interp(samples, grid, log_p))
    assert got["kl"] == pytest.approx(mc_kl, abs=0.01)


@pytest.mark.parametrize("mode, family", [("bon", BoNExpTransform), ("won", WoNExpTransform)])
def test_optimal_transform_beats_exp_family_at_equal_kl(mode, family):
    n, beta = 4, 0.2
    opt = theory.optimal_density(n, mode, beta)
    opt_kl, opt_win = opt.kl(), theory.inference_win_rate(opt, n, mode)
    wins = []
    for t in (1.0, 3.0, 8.0, 15.0, 30.0):
        transform = family(t)
        b = theory.beta_for_kl(transform, opt_kl)
        density = theory.tilted_density(transform, b)
        assert density.kl() == pytest.approx(opt_kl, rel=1e-6)
        wins.append(theory.inference_win_rate(density, n, mode))
    assert max(wins) <= opt_win + 1e-7
    best = theory.best_t(mode, n, opt_kl)
    assert best["win_rate"] <= opt_win + 1e-7
    assert opt_win - best["win_rate"] < 0.005  # the exp family comes within half a point
    assert best["win_rate"] >= max(wins) - 1e-6


def test_best_t_in_the_expected_range():
    # math page: best-of-N at KL 0.25-1 wants t of about 10-20 for N=4 (worst-of-N about 8-15)
    assert 8 <= theory.best_t("bon", 4, 0.5)["t"] <= 22
    assert 5 <= theory.best_t("won", 4, 0.5)["t"] <= 18


def test_optimal_transform_is_a_fixed_point():
    grid, phi = theory.optimal_transform(3, "bon", 0.3)
    from infalign.theory.solve import _functional_derivative

    again = _functional_derivative(theory.tilted_density(theory.TabulatedPhi(grid, phi), 0.3, grid), 3, "bon")
    assert np.max(np.abs(again - phi)) < 1e-8


@pytest.mark.parametrize(
    "transform, beta",
    [(BoNExpTransform(1e4), 1e-4), (WoNExpTransform(1e4), 1e-4), (LogTransform(1e-12), 1e-4), (BoNExpTransform(50.0), 1e-6)],
)
def test_extreme_t_over_beta_stays_finite(transform, beta):
    got = theory.analyze(transform, beta, 8)
    assert all(math.isfinite(v) for v in got.values()), got
    assert got["kl"] >= 0.0 and 0.5 <= got["win_rate"] <= 1.0 + 1e-12


def test_kl_and_win_rates_monotone_in_beta():
    rows = [theory.analyze(BoNExpTransform(10.0), b, 4) for b in (0.05, 0.1, 0.5, 2.0)]
    assert all(a["kl"] > b["kl"] and a["bon_win_rate"] > b["bon_win_rate"] for a, b in zip(rows, rows[1:]))


def test_beta_for_kl_round_trip():
    beta = theory.beta_for_kl(BoNExpTransform(10.0), 0.7)
    assert theory.kl(BoNExpTransform(10.0), beta) == pytest.approx(0.7, rel=1e-8)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: theory.analyze(IdentityTransform(), 0.1, 0), "n must be >= 1"),
        (lambda: theory.analyze(IdentityTransform(), 0.1, 2.5), "positive integer"),
        (lambda: theory.analyze(IdentityTransform(), 0.0, 2), "beta"),
        (lambda: theory.analyze(IdentityTransform(), -1.0, 2), "beta"),
        (lambda: theory.analyze(RawTransform(), 0.1, 2), "raw transform has no model-agnostic"),
        (lambda: theory.beta_for_kl(IdentityTransform(), -0.1), "target KL"),
        (lambda: theory.beta_for_kl(IdentityTransform(), 1e6), "cannot reach KL"),
        (lambda: theory.optimal_transform(2, "median", 0.1), "mode"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cli_prints_json_last_line(tmp_path):
    cmd = [sys.executable, "-m", "infalign.theory", "transform=bon_exp", "transform.t=4", "beta=0.1", "n=4",
           f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == pytest.approx(theory.analyze(BoNExpTransform(4.0), 0.1, 4))


def test_cli_curve_mode_writes_csv_and_png(tmp_path):
    cmd = [sys.executable, "-m", "infalign.theory", "mode=curve", "curve.ns=[2,4]", "curve.points=4",
           f"hydra.run.dir={tmp_path}"]
    subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path)
    lines = (tmp_path / "win_rate_curves.csv").read_text().splitlines()
    assert lines[0] == "transform,n,beta,kl,win_rate,bon_win_rate,won_win_rate"
    names = {line.split(",")[0] for line in lines[1:]}
    assert {"identity", "optimal_bon", "optimal_won", "bon_exp_t4"} <= names
    assert len(lines) == 1 + len(names) * 2 * 4  # every curve at 2 N and 4 betas
    assert (tmp_path / "win_rate_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_bad_n(tmp_path):
    out = subprocess.run([sys.executable, "-m", "infalign.theory", "n=0", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "n must be >= 1" in out.stderr
