"""The KL-efficient solver's parts (issue 15): the exact per-token KL and its gradient, distillation's weights,
the leave-one-out calibration, the learning-rate schedule, the gradient noise scale, the null control; and
each solver end to end at the smoke scale (in process: the config check and the run `python train.py` makes)."""

import csv
import itertools
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from infalign.core.calibration import leave_one_out_calibrated
from infalign.core.losses import (
    GradientNoiseScale,
    distillation_weights,
    exact_kl_advantages,
    kl_to_go,
    rloo_loss,
    token_kl,
)
from infalign.models.logprobs import response_logprobs
from infalign.models.sampling import Rollout
from infalign.trainer.schedules import warmup_cosine

SMOKE = ["scale=smoke", "progress=false", "logger=none"]


# ---------------------------------------------------------------------------------------------- exact KL
def _tiny_lm(seed: int, vocab: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _all_sequences(prompt: list[int], length: int, vocab: int) -> Rollout:
    rows = [prompt + list(y) for y in itertools.product(range(vocab), repeat=length)]
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    return Rollout(ids, mask, torch.ones(len(rows), length, dtype=torch.long), prompt_len=len(prompt))


def test_exact_token_kl_sums_to_the_brute_force_sequence_kl():
    """On a 3-token vocabulary, every response of length 3 enumerated: E_pi[sum_t KL_t] (the per-position KL
    over the whole vocabulary, summed along the response) equals sum_y pi(y) log(pi(y) / pi_ref(y)), the KL
    of the two distributions over whole responses."""
    policy, reference = _tiny_lm(0), _tiny_lm(1)
    rollout = _all_sequences([0, 2], length=3, vocab=3)
    with torch.no_grad():
        logp, logp_all = response_logprobs(policy, rollout, full_vocabulary=True)
        ref_logp, ref_all = response_logprobs(reference, rollout, full_vocabulary=True)
    seq_logp, seq_ref = logp.sum(-1).double(), ref_logp.sum(-1).double()
    prob = seq_logp.exp()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-5)  # the 27 responses are all there is
    brute_force = (prob * (seq_logp - seq_ref)).sum().item()
    per_token = token_kl(logp_all, ref_all, rollout.response_mask).sum(-1).double()
    assert (prob * per_token).sum().item() == pytest.approx(brute_force, rel=1e-4, abs=1e-6)
    assert brute_force > 1e-3  # two different models: a KL worth checking
    # and per position it is the textbook sum over the vocabulary
    p, q = logp_all[5, 1].double(), ref_all[5, 1].double()
    assert per_token.new_tensor(float((p.exp() * (p - q)).sum())).item() == pytest.approx(
        float(token_kl(logp_all, ref_all, rollout.response_mask)[5, 1]), rel=1e-5)


def test_exact_kl_loss_has_the_gradient_of_the_regularised_objective():
    """Weighting each enumerated response's loss by its probability gives the loss's expectation; its gradient
    must be minus the gradient of J = E_pi[Phi] - beta KL(pi || pi_ref), computed by autograd on the
    enumerated J. (With the score-function KL-to-go term left out, or the pathwise term, it is not.)"""
    beta = 0.3
    policy, reference = _tiny_lm(0), _tiny_lm(1)
    rollout = _all_sequences([1], length=2, vocab=3)
    phi = torch.tensor([float(i % 4) / 3 for i in range(rollout.input_ids.shape[0])], dtype=torch.float64)

    def grads(loss):
        policy.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in policy.parameters()])

    logp, logp_all = response_logprobs(policy, rollout, full_vocabulary=True)
    with torch.no_grad():
        ref_logp, ref_all = response_logprobs(reference, rollout, full_vocabulary=True)
    seq_logp = logp.sum(-1).double()
    objective = (seq_logp.exp() * (phi - beta * (seq_logp - ref_logp.sum(-1).double()))).sum()
    g_true = grads(-objective)

    def surrogate(with_to_go=True, with_pathwise=True):
        logp, logp_all = response_logprobs(policy, rollout, full_vocabulary=True)
        kl = token_kl(logp_all, ref_all, rollout.response_mask)
        weight = logp.sum(-1).double().exp().detach()
        to_go = kl_to_go(kl.detach().double()) if with_to_go else torch.zeros_like(kl.double())
        adv = phi.unsqueeze(-1) - beta * to_go  # no baseline: the exact expectation needs none
        per_seq = -(adv.float() * logp).sum(-1)
        if with_pathwise:
            per_seq = per_seq + beta * kl.sum(-1)
        return (weight.float() * per_seq).sum()

    assert torch.allclose(grads(surrogate()), g_true, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(grads(surrogate(with_to_go=False)), g_true, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(grads(surrogate(with_pathwise=False)), g_true, atol=1e-5, rtol=1e-4)


def test_exact_kl_advantages_hand_computed():
    phi = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.4, 0.0]], dtype=torch.float64)
    assert torch.allclose(kl_to_go(kl), torch.tensor([[0.5, 0.3, 0.0], [0.4, 0.0, 0.0]], dtype=torch.float64))
    adv = exact_kl_advantages(phi, kl, beta=0.5)
    # baseline of sample 0 = the other's total: 0 - 0.5 * 0.4 = -0.2; of sample 1: 1 - 0.5 * 0.6 = 0.7
    expected = torch.tensor([[1.2 - 0.25, 1.2 - 0.15, 1.2], [-0.7 - 0.2, -0.7, -0.7]], dtype=torch.float64)
    assert torch.allclose(adv, expected)
    # per-token advantages drive rloo_loss token by token
    logp = torch.zeros(2, 3, requires_grad=True)
    rloo_loss(logp, torch.ones(2, 3), adv.float()).backward()
    assert torch.allclose(logp.grad, -expected.float() / 2)


# ---------------------------------------------------------------------------------------------- distillation
def test_leave_one_out_calibration_hand_computed():
    r = torch.tensor([[0.1, 0.5, 0.5, 0.9]])
    # against the other three: 0.1 beats none; 0.5 beats 0.1 and ties 0.5; 0.9 beats all three
    assert torch.allclose(leave_one_out_calibrated(r), torch.tensor([[0.0, 1.5 / 3, 1.5 / 3, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="M >= 2"):
        leave_one_out_calibrated(torch.ones(2, 1))


def test_distillation_weights_and_effective_sample_size_hand_made():
    w, ess = distillation_weights(torch.zeros(1, 8), beta=0.1)  # equal Phi: the reference itself
    assert torch.allclose(w, torch.full((1, 8), 1 / 8, dtype=torch.float64)) and ess.item() == pytest.approx(8.0)
    # two samples, Phi 1 and 0 at beta 1: w = (e, 1) / (e + 1), ESS = (e + 1)^2 / (e^2 + 1)
    w, ess = distillation_weights(torch.tensor([[1.0, 0.0]]), beta=1.0)
    e = math.e
    assert w[0, 0].item() == pytest.approx(e / (e + 1)) and ess.item() == pytest.approx((e + 1) ** 2 / (e * e + 1))
    # a tiny beta: one sample holds all the weight, no overflow
    w, ess = distillation_weights(torch.tensor([[1.0, 0.9, 0.0]]), beta=1e-4)
    assert torch.isfinite(w).all() and ess.item() == pytest.approx(1.0) and w[0, 0].item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- stored samples
class _LengthReward:
    """Reward = response length in characters: any deterministic score will do for these tests."""

    def score(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


def _tiny_policy():
    from infalign.models.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["Human: hi there, how are you. Assistant: hello friend, fine thanks"] * 8,
                              vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)).eval()
    with torch.no_grad():  # a large EOS embedding (tied to the output): some samples end early, some do not
        model.transformer.wte.weight[tok.eos_token_id] *= 40
    return tok, model


def test_rollout_from_tokens_reproduces_the_sampled_rollout():
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import generate, rollout_from_tokens

    tok, model = _tiny_policy()
    prompts, k = ["Human: hi. Assistant:", "Human: how are you there? Assistant:"], 6
    torch.manual_seed(1)
    sampled = generate(model, tok, prompts, k, sampling_kwargs({"max_new_tokens": 12}))
    lengths = sampled.lengths.view(len(prompts), k)
    assert len(set(lengths.flatten().tolist())) > 1  # some ended early: padding is exercised
    tokens = sampled.response_ids.view(len(prompts), k, -1)
    rebuilt = rollout_from_tokens(tok, prompts, tokens, lengths)
    width = rebuilt.response_mask.shape[1]
    assert width == int(lengths.max())
    assert torch.equal(rebuilt.response_mask, sampled.response_mask[:, :width])
    real = rebuilt.response_mask.bool()
    assert torch.equal(rebuilt.response_ids[real], sampled.response_ids[:, :width][real])
    with torch.no_grad():
        assert torch.allclose(response_logprobs(model, rebuilt), response_logprobs(model, sampled)[:, :width],
                              atol=1e-5)
    with pytest.raises(ValueError, match=r"tokens \[P, k, T\] and lengths \[P, k\]"):
        rollout_from_tokens(tok, prompts, tokens, lengths[:1])


def test_reference_samples_store_the_sampled_token_paths(tmp_path):
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import decode_responses, rollout_from_tokens
    from infalign.trainer.calibration_cache import load_or_build_reference_samples, load_reference_samples

    tok, model = _tiny_policy()
    prompts = ["Human: hi. Assistant:", "Human: bye. Assistant:", "Human: how are you? Assistant:"]
    samples = load_or_build_reference_samples(
        cache_root=tmp_path, key={"test": "tokens"}, prompt_ids=["a", "b", "c"], prompts=prompts,
        reward_prompts=prompts, reference=model, tokenizer=tok, reward_model=_LengthReward(), m=4,
        gen_kwargs=sampling_kwargs({"max_new_tokens": 10}), seed=0, progress=False, prompts_per_batch=2)
    tokens, lengths = samples.tokens_for(["c", "a"])
    assert tokens.shape[:2] == (2, 4) and tokens.dtype == torch.int32
    rebuilt = rollout_from_tokens(tok, [prompts[2], prompts[0]], tokens, lengths)
    # the stored paths decode to the stored texts, whose scores are the stored rewards
    texts = decode_responses(tok, rebuilt)
    assert texts == [t for group in samples.responses_for(["c", "a"]) for t in group]
    assert torch.equal(samples.rewards_for(["c", "a"]).flatten(), torch.tensor([float(len(t)) for t in texts]))
    old = samples.cache_path / "response_tokens.safetensors"
    old.unlink()  # an entry from before the token ids were stored: a clear error, not texts re-encoded
    with pytest.raises(RuntimeError, match="delete the entry and re-run"):
        load_reference_samples(samples.cache_path, ["a", "b", "c"], 4).tokens_for(["a"])


# ---------------------------------------------------------------------------------------------- optimiser
def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, total_steps=12, warmup_steps=2, final_lr_fraction=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # non-increasing after the warm-up
    constant = warmup_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3), total_steps=5)
    assert constant.get_last_lr() == [0.3]
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(opt, 10, warmup_steps=-1)


def test_gradient_noise_scale_recovers_a_known_noise():
    """Minibatch gradients g_b = G + noise / sqrt(b) with known |G|^2 and tr(Sigma): the estimate converges."""
    torch.manual_seed(0)
    dim, b, steps, true_g = 50, 8, 4, torch.full((50,), 0.2)
    trace = 5.0  # Sigma = (5 / 50) I per sample
    gns = GradientNoiseScale(decay=0.99)
    for _ in range(3000):
        gs = [true_g + torch.randn(dim) * math.sqrt(trace / dim / b) for _ in range(steps)]
        small = sum(float(g.pow(2).sum()) for g in gs) / steps
        big = float(torch.stack(gs).mean(0).pow(2).sum())
        out = gns.update(small, big, b, b * steps)
    assert out["grad/noise_scale"] == pytest.approx(trace / float(true_g.pow(2).sum()), rel=0.15)


# ---------------------------------------------------------------------------------------------- end to end
def _final(run_dir):
    return json.loads((run_dir / "final_metrics.json").read_text())


def _logged(run_dir):
    return list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))


def _train(session_cache, run_dir, *overrides):
    """What `python train.py <SMOKE> <overrides> hydra.run.dir=<run_dir>` runs, in this process (no start-up)."""
    from infalign.trainer.inprocess import run_in_process

    return run_in_process([*SMOKE, *overrides, f"cache_root={session_cache}"], run_dir)


def test_exact_kl_solver_runs_and_logs_its_kl(session_cache, tmp_path):
    run_dir = tmp_path / "exact"
    _train(session_cache, run_dir, "solver=exact")
    rows = [r for r in _logged(run_dir) if r.get("train/kl/exact")]
    assert len(rows) == 3 and all(float(r["train/kl/exact"]) >= 0 for r in rows)
    # 2 minibatches per iteration at smoke size: the estimator runs; its scale is logged (> 0) only where defined
    assert all(r.get("train/grad/true_norm_sq") for r in rows)
    assert all(float(r["train/grad/noise_scale"]) > 0 for r in rows if r.get("train/grad/noise_scale"))
    assert math.isfinite(_final(run_dir)["eval/kl"])


def test_the_removed_k3_loss_mode_is_refused_naming_the_modes_there_are(run_train, tmp_path):
    out = run_train(*SMOKE, "rl.kl_penalty=loss", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert out.returncode == 2 and "rl.kl_penalty must be 'reward' or 'exact'" in out.stderr, out.stderr


def test_distillation_then_rl_with_a_schedule(session_cache, tmp_path):
    run_dir = tmp_path / "distill"
    _train(session_cache, run_dir, "solver=distill_rl", "distill.iterations=2", "distill.m=8",
           "scheduler.warmup_steps=2", "scheduler.final_lr_fraction=0.1")
    rows = _logged(run_dir)
    distilled = [r for r in rows if r.get("train/distill/ess")]
    rl = [r for r in rows if r.get("train/kl/k1")]
    assert len(distilled) == 2 and len(rl) == 1  # the first 2 of rl.iterations=3 distil, then RL
    assert all(1.0 <= float(r["train/distill/ess"]) <= 8.0 for r in distilled)
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]  # at each iteration's first step
    assert len(lrs) == 3 and lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warmed up, then the cosine decays
    assert _final(run_dir)["iteration"] == 3
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["lr_schedulers"], "the schedule's state is checkpointed"


def test_null_control_spends_kl_at_win_rate_one_half(session_cache, tmp_path):
    """Phi shuffled within each prompt's samples: the policy still moves (KL > 0) but learns nothing of the
    reward, so its win rates stay at 0.5 within their standard errors. A leak of the reward's order into the
    advantages shows up here as a win rate off 0.5."""
    run_dir = tmp_path / "null"
    _train(session_cache, run_dir, "rl.null_control=true", "rl.iterations=6", "optimizer.lr=3e-3", "eval.every=0",
           "data.eval_prompts=12", "eval.k=16")
    final = _final(run_dir)
    assert final["eval/kl"] > 0.01, "the null control must spend KL (drift) for the check to mean anything"
    for key in ("eval/bon_win_rate@1", "eval/bon_win_rate@4"):
        assert abs(final[key] - 0.5) < 3 * final[f"{key}_se"] + 0.02, (key, final[key], final[f"{key}_se"])
