"""`response_logprobs` in chunks: the same log-probs, entropies and gradients as one full forward pass of the
model, while no chunk's scores exceed the budget (issue 16: SmolLM2's 49k-token vocabulary)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import infalign.models.logprobs as logprobs_mod
from infalign.models.logprobs import response_logprobs
from infalign.models.sampling import Rollout

VOCAB = 96


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def rollout(k: int = 3) -> Rollout:
    """2 prompts (one left-padded) x k samples of 5 response tokens, the last sample of each ending early."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, VOCAB, (2, 6), generator=g)
    prompt_mask = torch.ones(2, 6, dtype=torch.long)
    prompts[1, :2], prompt_mask[1, :2] = 0, 0
    responses = torch.randint(3, VOCAB, (2 * k, 5), generator=g)
    response_mask = torch.ones(2 * k, 5, dtype=torch.long)
    response_mask[k - 1:: k, 3:] = 0
    return Rollout(input_ids=torch.cat([prompts.repeat_interleave(k, 0), responses], 1),
                   attention_mask=torch.cat([prompt_mask.repeat_interleave(k, 0), response_mask], 1),
                   response_mask=response_mask, prompt_len=6)


def brute_force(model, r: Rollout):
    """Log-probs and entropies from the model's own full forward pass over each whole sequence."""
    position_ids = (r.attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=position_ids).logits
    logp_all = torch.log_softmax(logits[:, r.prompt_len - 1:-1].float(), -1)
    logp = logp_all.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1) * r.response_mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * r.response_mask
    return logp, entropy.detach()


def grads(model, logp: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logp.sum(-1) * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("budget", [4 * VOCAB * 7, 4 * VOCAB, logprobs_mod.LOGITS_BUDGET])  # 7 positions, 1, all
def test_chunked_logprobs_entropy_and_gradients_equal_one_full_pass(arch, budget):
    model, r = tiny_model(arch), rollout()
    weights = torch.randn(r.input_ids.shape[0], generator=torch.Generator().manual_seed(2))
    want_logp, want_entropy = brute_force(model, r)
    want_grads = grads(model, want_logp, weights)
    logp, entropy = response_logprobs(model, r, with_entropy=True, budget=budget)
    assert torch.allclose(logp, want_logp, atol=1e-5)
    assert torch.allclose(entropy, want_entropy, atol=1e-5)
    got = grads(model, logp, weights)
    assert got.keys() == want_grads.keys()
    for name, g in want_grads.items():
        assert torch.allclose(got[name], g, atol=1e-5, rtol=1e-4), name


def test_no_chunk_of_scores_exceeds_the_budget():
    model, r = tiny_model("llama"), rollout()
    sizes = []
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: sizes.append(out.numel()))
    budget = 4 * VOCAB * 7
    response_logprobs(model, r, budget=budget).sum().backward()  # forward, and the backward's recomputation
    assert sizes and max(sizes) * 4 <= budget
    assert len(sizes) >= 2 * (r.response_mask.shape[0] * 5 // 7)  # chunks were run, and run again in backward
    sizes.clear()
    response_logprobs(model, r, budget=logprobs_mod.LOGITS_BUDGET)
    assert sizes == [r.response_mask.shape[0] * 5 * VOCAB]  # within the budget: one piece


def test_full_vocabulary_mode_returns_the_whole_log_softmax():
    model, r = tiny_model("gpt2"), rollout()
    logp, logp_all = response_logprobs(model, r, full_vocabulary=True, budget=4 * VOCAB)
    want, _ = brute_force(model, r)
    assert logp_all.shape == (r.response_mask.shape[0], 5, VOCAB)
    assert torch.allclose(logp, want, atol=1e-5)


def test_soft_capped_scores_go_through_the_models_own_forward():
    model = tiny_model("gpt2")
    model.config.final_logit_softcapping = 30.0  # the head alone would not give this model's scores
    assert logprobs_mod._plain_head(model) is None
    assert isinstance(logprobs_mod._plain_head(tiny_model("llama")), torch.nn.Linear)
    r = rollout()
    want, _ = brute_force(model, r)
    assert torch.allclose(response_logprobs(model, r), want, atol=1e-5)


def test_gradients_are_bit_identical_on_several_threads():
    """Rows sharing a prompt in no particular order (a distillation minibatch: pool draws of 16 prompts, 4 each): the
    shared prompt's gradient, summed back over its rows, is the same to the bit on every call with 2 threads. The
    backward of advanced indexing (`cache.batch_select_indices`) added the rows with atomic adds across threads, in
    no fixed order, once the prompt cache exceeds torch's grain size (here 64 rows x 39 positions x 16 features):
    `solver=distill` runs were not reproducible at num_threads=2."""
    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, VOCAB, (16, 40), generator=g)
    order = torch.randperm(64, generator=g)
    responses = torch.randint(3, VOCAB, (64, 5), generator=g)
    r = Rollout(input_ids=torch.cat([prompts.repeat_interleave(4, 0)[order], responses], 1),
                attention_mask=torch.ones(64, 45, dtype=torch.long), response_mask=torch.ones(64, 5, dtype=torch.long),
                prompt_len=40)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {tuple(hash(t.numpy().tobytes()) for t in grads(model, response_logprobs(model, r), torch.ones(64))
                      .values()) for _ in range(20)}
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1, f"{len(seen)} different gradients in 20 identical calls"
