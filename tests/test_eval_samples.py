"""The evaluation's sample rows show what best-of-N serves (the pick among the first n samples, policy and
reference, by the raw reward the win rate compares) with each response's length, the prompt from a whole word,
and the mean response lengths beside the win rates. No model: `WinRateCallback._samples` on given rewards."""

import pytest
import torch

from infalign.core.calibration import EmpiricalCalibrator
from infalign.trainer.calibration_cache import ReferenceSamples
from infalign.trainer.eval_samples import SAMPLE_COLUMNS, shown_prompt
from infalign.trainer.evaluation import WinRateCallback

WHOLE = "\n\nHuman: Where is Georgia?\n\nAssistant:"
CUT = "ia has been a disaster area forever.\n\nAssistant:"  # `truncate_prompt` cut it mid-word from the left


def test_a_prompt_cut_mid_turn_is_shown_from_its_first_whole_word():
    assert shown_prompt(CUT) == "…has been a disaster area forever.\n\nAssistant:"
    assert shown_prompt(WHOLE) == WHOLE  # whole, or cut at a turn boundary: as the models read it
    assert shown_prompt("\n\nAssistant: Sure.\n\nHuman: Why?\n\nAssistant:").startswith("\n\nAssistant: Sure.")
    assert shown_prompt(" has been.\n\nAssistant:") == "…has been.\n\nAssistant:"  # cut at a space: no word lost
    assert shown_prompt("ectively\n\nAssistant:") == "…ectively\n\nAssistant:"  # one word only: kept, the marker too


def callback(tmp_path, mode="bon"):
    # M = 5 reference samples: the largest reward of "a" is its 5th, outside the first n = 4
    ref = ReferenceSamples(["a", "b", "other"], torch.tensor([[0.1, 0.9, 0.3, 0.5, 2.0], [0.4, 0.2, 0.6, -0.3, -1.0],
                                                              [0.0] * 5]),
                           [[f"{p}{i}" for i in range(5)] for p in ("a", "b", "other")],
                           response_tokens=torch.zeros(3, 5, 8, dtype=torch.int32),
                           response_lengths=torch.tensor([[3, 4, 5, 6, 7], [1, 2, 3, 4, 5], [100] * 5], dtype=torch.int32))
    return WinRateCallback([("a", "A", WHOLE), ("b", "B", CUT)], ref, [1, 2, 4], 8, 0, {}, tmp_path, log_samples=2,
                           n=4, mode=mode)


def rows_of(cb):
    # k = 8 policy samples; the largest reward of "a" is its 7th, outside the first n = 4
    raw = torch.tensor([[0.2, 0.7, -1.0, 0.1, 0.0, 0.0, 5.0, 0.0], [-0.5, 0.3, 0.8, 0.9, 0.0, 0.0, 0.0, -2.0]],
                       dtype=torch.float64)
    ref = cb.reference_samples.rewards_for(["a", "b"]).double()
    texts = [f"{p}-policy{i}" for p in ("a", "b") for i in range(8)]
    lengths = torch.arange(16) + 1
    return cb._samples(range(2), ["a", "b"], [WHOLE, CUT], texts, lengths, raw, EmpiricalCalibrator()(raw, ref), ref)


@pytest.mark.parametrize("mode, policy_pick, reference_pick", [("bon", [1, 3], [1, 2]), ("won", [2, 0], [0, 3])])
def test_the_sample_row_carries_the_pick_of_the_first_n_by_raw_reward(tmp_path, mode, policy_pick, reference_pick):
    cb = callback(tmp_path, mode)
    rows = rows_of(cb)
    for r in rows:
        assert [c for c in SAMPLE_COLUMNS if c not in ("iteration", "step")] == [c for c in r if c != "_index"]
        assert r["pick"] == f"{mode}@4"
    raw = [[0.2, 0.7, -1.0, 0.1], [-0.5, 0.3, 0.8, 0.9]]  # the first n = 4 of each prompt's policy samples
    ref = [[0.1, 0.9, 0.3, 0.5], [0.4, 0.2, 0.6, -0.3]]
    choose = max if mode == "bon" else min
    for r, p, q, a, b, pid in zip(rows, policy_pick, reference_pick, raw, ref, "ab"):
        assert r["policy_pick_reward_raw"] == choose(a) == a[p] and r["policy_pick_response"] == f"{pid}-policy{p}"
        assert r["reference_pick_reward_raw"] == pytest.approx(choose(b)) and r["reference_pick_response"] == f"{pid}{q}"
        # the first samples as before, each with its length in tokens
        assert r["policy_response"] == f"{pid}-policy0" and r["reference_response"] == f"{pid}0"
    assert [r["policy_tokens"] for r in rows] == [1, 9] and [r["reference_tokens"] for r in rows] == [3, 1]
    assert [r["policy_pick_tokens"] for r in rows] == [1 + policy_pick[0], 9 + policy_pick[1]]
    assert [r["reference_pick_tokens"] for r in rows] == [3 + reference_pick[0], 1 + reference_pick[1]]
    # the calibrated reward of the pick is that of the same sample, against all M reference samples
    assert rows[0]["policy_pick_reward_calibrated"] == (0.6 if mode == "bon" else 0.0)  # 3 or 0 of the M = 5 below
    assert [r["prompt"] for r in rows] == [WHOLE, shown_prompt(CUT)]


def test_the_reference_mean_length_is_over_the_evaluation_prompts_samples(tmp_path):
    assert callback(tmp_path).reference_tokens == pytest.approx((25 + 15) / 10)  # not "other"'s 100s


def test_the_pick_is_one_of_the_evaluated_ns(tmp_path):
    with pytest.raises(ValueError, match="samples pick"):
        WinRateCallback([("a", "A", WHOLE)], None, [1, 2], 2, 0, {}, tmp_path, n=4)
    assert WinRateCallback([("a", "A", WHOLE)], None, [1, 2], 2, 0, {}, tmp_path).n == 2  # not given: the largest
