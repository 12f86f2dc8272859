"""bf16 mixed precision: the rollout's KL log-probs stay fp32 under Lightning's autocast."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from infalign.runtime.paths import conf_dir


@pytest.fixture(scope="module")
def smoke_models(session_cache):
    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.models.reward import load_reward_model
    from infalign.trainer.prompts import prompt_sets as _prompt_sets

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["scale=smoke", f"cache_root={session_cache}"])
    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
    reward = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions, progress=False)
    train_prompts, _ = _prompt_sets(cfg, partitions, tokenizer)
    return cfg, reference, tokenizer, reward, train_prompts[:4]


def test_rollout_kl_logprobs_are_fp32_under_bf16_autocast(smoke_models):
    from lightning.pytorch.plugins.precision import MixedPrecision

    from infalign.core.calibration import EmpiricalCalibrator
    from infalign.core.losses import sequence_kl
    from infalign.core.transforms import BoNExpTransform
    from infalign.models.logprobs import response_logprobs
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.trainer.calibration_cache import CachedSamples, ReferenceSamples
    from infalign.trainer.experience import RolloutBuilder
    from infalign.trainer.module import InfAlignModule
    from infalign.trainer.solvers import RLOO

    cfg, reference, tokenizer, reward, prompts = smoke_models
    ids = [p.id for p in prompts]
    solver = RLOO(beta=0.05, k=4, minibatch_size=8, prompts_per_iteration=4)
    module = InfAlignModule(reference, tokenizer, reward, EmpiricalCalibrator(), BoNExpTransform(t=4.0), solver=solver,
                            optimizer=torch.optim.AdamW, iterations=1)
    with torch.no_grad():  # a policy unlike the reference, so the KL is not zero by construction
        for p in module.policy.parameters():
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
            p.add_(noise * 0.05 * p.std().nan_to_num(0))
    cache = ReferenceSamples(ids, torch.randn(len(ids), 8), [[""] * 8 for _ in ids])
    builder = RolloutBuilder(policy=module.policy, reference=module.reference, tokenizer=tokenizer, reward_model=reward,
                             calibrator=module.calibrator, transform=module.transform,
                             gen_kwargs=sampling_kwargs(cfg.generation), seed=0, calibration=CachedSamples.ready(cache))
    with MixedPrecision("bf16-mixed", "cpu").forward_context():  # exactly what trainer.precision=bf16-mixed does
        assert torch.is_autocast_enabled("cpu")
        buffer = builder.build(solver.experience(0), prompts, 0)
    rollout = buffer.rollout
    with torch.no_grad():
        logp, ref_logp = response_logprobs(module.policy, rollout), response_logprobs(module.reference, rollout)
        with MixedPrecision("bf16-mixed", "cpu").forward_context():
            logp_bf16 = response_logprobs(module.policy, rollout)
    assert not torch.equal(logp_bf16, logp)  # bf16 does change them: the check below can tell
    assert torch.equal(buffer.old_logp, logp)  # fp32, bit for bit
    assert buffer.stats["kl/k1"] == sequence_kl(logp, ref_logp, rollout.response_mask)["k1"].mean().item()
