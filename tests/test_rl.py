import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from infalign.core.losses import AdaptiveKLController, ppo_clip_loss, rloo_advantages, rloo_loss, sequence_kl
from infalign.models.logprobs import response_logprobs
from infalign.models.pure_sampling import sampling_kwargs
from infalign.models.sampling import decode_responses, generate


def test_rloo_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # A_i = R_i - mean of the other two
    expected = torch.tensor([[1 - 2.5, 2 - 2.0, 3 - 1.5], [0 - 3.0, 0 - 3.0, 6 - 0.0]])
    assert torch.allclose(rloo_advantages(rewards), expected)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(3, 1))


def test_rloo_loss_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0])
    loss = rloo_loss(logp, mask, adv)
    # -(2 * (-3) + (-1) * (-0.5)) / 2 = (6 - 0.5) / 2
    assert loss.item() == pytest.approx(2.75)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]))


def test_ppo_first_pass_has_rloo_gradient_and_clips_later():
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.2).long()
    adv = torch.randn(4)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    rloo_loss(a, mask, adv).backward()
    loss, clip_frac = ppo_clip_loss(b, logp, mask, adv)
    loss.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6) and clip_frac == 0
    _, clip_frac = ppo_clip_loss(logp + 1.0, logp, mask, adv, clip=0.2)  # ratio e > 1.2 everywhere
    assert clip_frac == pytest.approx(1.0)


def test_sequence_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])
    kl = sequence_kl(logp, ref, mask)
    assert kl["k1"].item() == pytest.approx(0.5 - 1.0)
    r = torch.tensor([-0.5, 1.0])  # log(ref / pi) per unmasked token
    assert kl["k3"].item() == pytest.approx(float((r.exp() - 1 - r).sum()))
    assert kl["k3"].item() >= 0


def test_adaptive_kl_moves_beta_towards_target():
    ctl = AdaptiveKLController(beta=0.1, target=1.0, horizon=100)
    assert ctl.update(kl=3.0, n_steps=10) > 0.1  # too much KL: penalise more
    ctl = AdaptiveKLController(beta=0.1, target=1.0, horizon=100)
    assert ctl.update(kl=0.2, n_steps=10) < 0.1


def test_sampling_kwargs_sample_from_the_policy_itself():
    """The values are checked by the config check (tests/bad_input_cases.py: generation.temperature=0.7, ...)."""
    assert sampling_kwargs({"max_new_tokens": 5, "top_k": None, "top_p": None}) == {
        "sampler": "inverse_cdf", "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 5}


@pytest.fixture(scope="module")
def tiny_lm():
    vocab = {f"w{i}": i for i in range(40)}
    vocab.update({"<pad>": 40, "<eos>": 41})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=42, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       eos_token_id=41, bos_token_id=41, pad_token_id=40))
    return model.eval(), tokenizer


def test_logprobs_match_generate_scores_with_left_padding(tiny_lm):
    """transformers' `generate` scores its own samples of a left-padded batch as `response_logprobs` does."""
    from infalign.models.sampling import Rollout, tokenize_prompts

    model, tokenizer = tiny_lm
    prompts = ["w1 w2 w3 w4 w5 w6", "w7", "w8 w9 w10"]  # very different lengths: heavy left padding
    batch = tokenize_prompts(tokenizer, prompts)
    torch.manual_seed(1)
    out = model.generate(**batch, num_return_sequences=2, do_sample=True, top_k=0, max_new_tokens=8, pad_token_id=40,
                         eos_token_id=41, output_scores=True, return_dict_in_generate=True)
    prompt_len = batch["input_ids"].shape[1]
    is_eos = out.sequences[:, prompt_len:] == 41
    response_mask = ((is_eos.cumsum(-1) - is_eos.long()) == 0).long()  # up to the first EOS, included
    rollout = Rollout(out.sequences, torch.cat([batch["attention_mask"].repeat_interleave(2, 0), response_mask], 1),
                      response_mask, prompt_len)
    scores = torch.stack(out.scores, dim=1).log_softmax(-1)  # [S, T, V], unprocessed at temperature 1
    from_generate = scores.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1) * rollout.response_mask
    assert torch.allclose(response_logprobs(model, rollout), from_generate, atol=1e-5)


def test_logprobs_do_not_depend_on_batch_padding(tiny_lm):
    model, tokenizer = tiny_lm
    torch.manual_seed(2)
    rollout = generate(model, tokenizer, ["w3 w4", "w1 w2 w3 w4 w5 w6 w7 w8"], 1, sampling_kwargs({"max_new_tokens": 6}))
    batched = response_logprobs(model, rollout)
    # the short prompt alone, without padding, scored on the same response
    alone_ids = torch.cat([tokenizer(["w3 w4"], return_tensors="pt")["input_ids"], rollout.response_ids[:1]], dim=1)
    from infalign.models.sampling import Rollout

    alone = Rollout(alone_ids, torch.cat([torch.ones(1, 2, dtype=torch.long), rollout.response_mask[:1]], 1),
                    rollout.response_mask[:1], prompt_len=2)
    assert torch.allclose(response_logprobs(model, alone), batched[:1], atol=1e-5)


def test_response_mask_stops_after_first_eos(tiny_lm):
    model, tokenizer = tiny_lm
    torch.manual_seed(3)
    rollout = generate(model, tokenizer, ["w1"] * 4, 4, sampling_kwargs({"max_new_tokens": 12}))
    for ids, mask in zip(rollout.response_ids, rollout.response_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix
        eos = (ids[:n] == 41).nonzero()
        assert len(eos) <= 1 and (len(eos) == 0 or eos[0, 0] == n - 1)  # ends at its first EOS, if any
    texts = decode_responses(tokenizer, rollout)
    assert all("<pad>" not in t and "<eos>" not in t for t in texts)


def test_recorded_sampling_logprobs_match_a_full_pass(tiny_lm):
    model, tokenizer = tiny_lm
    torch.manual_seed(4)
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8"]  # left padding, k samples sharing each prompt's forward pass
    rollout = generate(model, tokenizer, prompts, 3, sampling_kwargs({"max_new_tokens": 7}), record_logprobs=True)
    logp, entropy = response_logprobs(model, rollout, with_entropy=True)
    assert torch.allclose(rollout.logprobs, logp, atol=1e-5)
    assert torch.allclose(rollout.entropy, entropy, atol=1e-4)
    assert generate(model, tokenizer, prompts, 3, sampling_kwargs({"max_new_tokens": 7})).logprobs is None


def test_shared_prompt_pass_gives_the_same_logprobs_and_gradient(tiny_lm, monkeypatch):
    import infalign.models.logprobs as rollout_mod

    model, tokenizer = tiny_lm
    torch.manual_seed(5)
    rollout = generate(model, tokenizer, ["w1 w2 w3", "w4 w5 w6 w7 w8 w9"], 4, sampling_kwargs({"max_new_tokens": 6}))
    weights = torch.randn(rollout.input_ids.shape[0])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logp = response_logprobs(model, rollout)
        (logp.sum(-1) * weights).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    shared, shared_grads = loss_and_grads()  # 2 distinct prompts: their prefixes run once each
    monkeypatch.setattr(rollout_mod, "_shared_prompt_groups", lambda *a: None)
    plain, plain_grads = loss_and_grads()  # one full pass per sequence
    assert torch.allclose(shared, plain, atol=1e-5)
    for name, g in plain_grads.items():
        assert torch.allclose(shared_grads[name], g, atol=1e-5, rtol=1e-4), name


def test_minibatches_keep_each_prompts_k_samples_together_and_cover_the_buffer_once():
    from infalign.models.sampling import Rollout
    from infalign.trainer.rollout import RolloutBuffer

    k, prompts = 4, 6
    rows = torch.arange(k * prompts)  # row i belongs to prompt i // k, as generate lays samples out
    rollout = Rollout(input_ids=rows[:, None].repeat(1, 3), attention_mask=torch.ones(len(rows), 3, dtype=torch.long),
                      response_mask=torch.ones(len(rows), 1, dtype=torch.long), prompt_len=2)
    buffer = RolloutBuffer(rollout=rollout, old_logp=rows.float()[:, None], advantages=rows.float(), stats={},
                           ref_logp=rows.float()[:, None], group=k)
    seen = []
    for sub, old_logp, _, adv in buffer.minibatches(8, torch.Generator().manual_seed(0)):
        ids = sub.input_ids[:, 0]
        assert torch.equal(ids.float(), adv) and torch.equal(ids.float(), old_logp[:, 0])  # rows stay aligned
        assert len(ids) == 8 and len(set((ids // k).tolist())) == 2  # two whole prompts
        seen += ids.tolist()
    assert sorted(seen) == rows.tolist()
    orders = {tuple(s.input_ids[:, 0].tolist()) for s, *_ in buffer.minibatches(8, torch.Generator().manual_seed(1))}
    assert any(o[0] // k != 0 for o in orders)  # the prompts are shuffled
    buffer.group = 1  # a pool's draws: one by one
    mixed = [s.input_ids[:, 0] for s, *_ in buffer.minibatches(8, torch.Generator().manual_seed(0))]
    assert any(len(set((m // k).tolist())) > 2 for m in mixed)  # group=1: samples shuffled one by one
