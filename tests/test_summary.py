"""What a run tells its user at the end (issue 27 item 6): the summary in plain words, an estimate near zero as
~0, no sentinel for an undefined gradient noise scale, one `cache hit` line per entry and run."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from infalign.core.losses import GradientNoiseScale
from infalign.runtime import artifacts
from infalign.runtime.artifacts import get_or_build
from infalign.trainer.summary import print_summary as _print_summary

FINAL = {  # a smoke run's final_metrics.json, trimmed
    "wall_seconds": 24.0, "transform": "bon_exp", "t": 21.09, "t_auto": True, "n": 4, "beta": 0.05,
    "eval/prompts": 6, "eval/bon_win_rate@4": 0.938, "eval/bon_win_rate@4_se": 0.013,
    "eval/won_win_rate@4": 0.871, "eval/won_win_rate@4_se": 0.02, "eval/bon_win_rate@1": 0.812,
    "eval/bon_win_rate@1_se": 0.011, "eval/kl": -0.005, "kl_calibrated": -0.021, "solver": "rloo", "metric": "bon",
    "gain_fraction": None, "kl_efficiency": 0.446, "gain_fraction_optimum": 0.879, "kl_efficiency_optimum": 0.214,
    "optimum_win_rate_at_kl": 0.999, "efficiency_note": "below the reference",
}


def _summary(capsys, tmp_path, **changes) -> str:
    _print_summary({**FINAL, **changes}, tmp_path, int(changes.get("n", FINAL["n"])))
    return capsys.readouterr().out


def test_the_summary_says_what_each_number_compares(capsys, tmp_path):
    out = _summary(capsys, tmp_path)
    assert "best-of-4 win rate   0.938 ± 0.013" in out
    assert "the policy's best of 4 samples beats the reference's best of 4" in out
    assert "worst-of-4 win rate  0.871 ± 0.020" in out and "the reference's worst of 4" in out
    assert "standard win rate    0.812 ± 0.011  (one policy sample beats one reference sample)" in out
    assert "against the reference policy on 6 held-out prompts" in out and "0.5 = no better" in out
    assert f"Files in {tmp_path}: final_metrics.json" in out
    # research diagnostics stay in final_metrics.json
    for jargon in ("gain fraction", "KL efficiency", "calibrated space", "optimum", "n/a"):
        assert jargon not in out, jargon
    assert "response length" not in out  # omitted where final_metrics.json has no lengths


def test_a_kl_estimate_near_or_below_zero_is_shown_as_about_zero(capsys, tmp_path):
    out = _summary(capsys, tmp_path)  # no standard error: below 0 is ~0
    assert "KL(policy || reference) ≈ 0 nats per response (estimate -0.005; a KL cannot be below 0" in out
    assert "-0.005 nats" not in out
    out = _summary(capsys, tmp_path, **{"eval/kl": 0.012, "eval/kl_se": 0.01})  # within 2 s.e. of 0
    assert "≈ 0 nats per response (estimate 0.012 ± 0.010, within 2 standard errors of 0)" in out
    out = _summary(capsys, tmp_path, **{"eval/kl": 4.53, "eval/kl_se": 0.1})
    assert "KL(policy || reference) 4.530 ± 0.100 nats per response" in out and "≈" not in out
    out = _summary(capsys, tmp_path, **{"eval/kl": 0.003})  # positive, no s.e.: as measured
    assert "KL(policy || reference) 0.003 nats per response" in out


def test_the_summary_shows_response_lengths_and_n1_once(capsys, tmp_path):
    out = _summary(capsys, tmp_path, **{"eval/response_tokens": 23.44, "eval/reference_response_tokens": 21.0})
    assert "Mean response length: policy 23.4 tokens, reference 21.0 tokens" in out
    out = _summary(capsys, tmp_path, n=1)  # best-of-1 is the standard win rate: said once
    assert "standard win rate" in out and "best-of-1" not in out and "worst-of-1" not in out


def test_an_undefined_gradient_noise_scale_is_not_logged():
    gns = GradientNoiseScale(decay=0.5)
    # |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b) = (16 * 0.4 - 8 * 1.0) / 8 < 0: the signal is below the noise
    out = gns.update(1.0, 0.4, 8, 16)
    assert out["grad/true_norm_sq"] < 0 and "grad/noise_scale" not in out  # was 1e9
    assert gns.scale is None and GradientNoiseScale().scale is None
    out = gns.update(1.0, 0.9, 8, 16)  # the moving average turns positive: the scale is defined again
    assert gns.g2 > 0 and out["grad/noise_scale"] == pytest.approx(gns.trace / gns.g2) == gns.scale


class _Builder:
    def __call__(self, out: Path):
        (out / "weights.bin").write_bytes(b"\x00" * 10)


def _hits(caplog) -> list[int]:
    return [r.levelno for r in caplog.records if r.getMessage().startswith("cache hit")]


def test_a_cache_hit_is_logged_once_per_entry_and_run(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(artifacts, "_reported", (None, set()), raising=False)
    with caplog.at_level(logging.DEBUG, logger="infalign.runtime.artifacts"):
        get_or_build(tmp_path, "thing", {"k": 1}, _Builder())  # built in this run: its later lookups are no news
        get_or_build(tmp_path, "thing", {"k": 1}, _Builder())
        assert _hits(caplog) == [logging.DEBUG]
        # a new process: the entry is in the cache
        monkeypatch.setattr(artifacts, "_reported", (None, set()), raising=False)
        caplog.clear()
        for _ in range(3):  # e.g. the reward model's loader looking up the reference policy again
            get_or_build(tmp_path, "thing", {"k": 1}, _Builder())
        assert _hits(caplog) == [logging.INFO, logging.DEBUG, logging.DEBUG]

        class Hydra:  # the next member of a multirun, in the same process: it logs its own hit
            @staticmethod
            def initialized():
                return True

            @staticmethod
            def get():
                return SimpleNamespace(runtime=SimpleNamespace(output_dir=str(tmp_path / "member1")))

        monkeypatch.setitem(__import__("sys").modules, "hydra.core.hydra_config", SimpleNamespace(HydraConfig=Hydra))
        caplog.clear()
        get_or_build(tmp_path, "thing", {"k": 1}, _Builder())
        get_or_build(tmp_path, "thing", {"k": 1}, _Builder())
        assert _hits(caplog) == [logging.INFO, logging.DEBUG]


def test_a_maxk_run_is_summarised_by_its_solver_not_the_unused_transform(capsys, tmp_path):
    out = _summary(capsys, tmp_path, solver="maxk", method="maxk", metric="won")  # as a maxk run records them
    assert "solver=maxk (the worst-of-4 win rate's own gradient" in out
    assert "transform=bon_exp" not in out and "t=21.09" not in out
    assert "transform=bon_exp (t=21.09" in _summary(capsys, tmp_path)  # the other solvers: the transform, as before
