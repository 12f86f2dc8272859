"""Distributed training on the CPU (`trainer=ddp trainer.devices=2`, gloo), checked against one process."""

import json
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from infalign.runtime.paths import conf_dir
from infalign.trainer.datamodule import IterationSampler

# calibration.seed=7: a calibration cache no other test builds, so the two processes build it here;
# eval.prompts_per_batch=2: the 6 evaluation prompts make 3 batches, split 2 + 1 between the processes.
DDP_RUN = ["scale=smoke", "logger=none", "calibration.seed=7", "eval.prompts_per_batch=2", "eval.every=0"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_iteration_sampler_shards_every_iteration_once(world):
    for epoch in range(6):  # 12 prompts, 4 per iteration: crosses permutation cycles
        full = IterationSampler(12, 4, seed=3)
        full.set_epoch(epoch)
        shards = []
        for rank in range(world):
            s = IterationSampler(12, 4, seed=3)
            s.shard(rank, world)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s) == 4 // world
        flat = [i for shard in shards for i in shard]
        assert sorted(flat) == sorted(full) and len(set(flat)) == 4  # disjoint, no padding repeats


def test_iteration_sampler_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        IterationSampler(12, 4, seed=0).shard(0, 3)


def test_ddp_run_matches_one_process(run_train, session_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.reward import load_reward_model
    from infalign.trainer.calibration_cache import load_or_build_reference_samples, load_reference_samples
    from infalign.trainer.evaluation import WinRateCallback
    from infalign.trainer.prompts import prompt_sets as _prompt_sets

    run_dir = tmp_path / "ddp"
    run_train(*DDP_RUN, "progress=false", "num_threads=1", "trainer=ddp", "trainer.devices=2",
              f"hydra.run.dir={run_dir}")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["eval/prompts"] == 6  # each evaluation prompt counted once over both processes
    assert final["step"] == 3 * 2  # per process 2 prompts x k=4 in minibatches of 8 / 2: as many steps as one process
    assert final["calibration_cache_hit"] is False

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*DDP_RUN, f"cache_root={session_cache}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes ran: same kernels, same floats
    try:
        partitions = load_partitions(cfg.data)
        reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
        reward_model = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions,
                                         progress=False)
        train_prompts, eval_prompts = _prompt_sets(cfg, partitions, tokenizer)
        everything = train_prompts + eval_prompts
        ids = [p[0] for p in everything]
        gen_kwargs = sampling_kwargs(cfg.generation)

        # The calibration cache the two processes built is the one a single process builds.
        built = load_reference_samples(final["calibration_cache"], ids, int(cfg.calibration.m))
        key = json.loads((built.cache_path / "manifest.json").read_text())["key"]
        single = load_or_build_reference_samples(
            cache_root=tmp_path / "one-process-cache", key=key, prompt_ids=ids, prompts=[p[1] for p in everything],
            reward_prompts=[p[2] for p in everything], reference=reference, tokenizer=tokenizer,
            reward_model=reward_model, m=int(cfg.calibration.m), gen_kwargs=gen_kwargs, seed=int(cfg.calibration.seed),
            prompts_per_batch=int(cfg.calibration.prompts_per_batch), progress=False)
        assert not single.cache_hit and torch.equal(single.rewards, built.rewards)
        assert single.responses == built.responses

        # The final policy evaluated by one process gives the win rates the two processes aggregated.
        policy = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
        module = SimpleNamespace(policy=policy, reference=reference, tokenizer=tokenizer, reward_model=reward_model,
                                 global_rank=0, _trainer=None, device=torch.device("cpu"))
        ns = sorted({int(x) for x in cfg.eval.ns} | {int(cfg.n)})
        callback = WinRateCallback(eval_prompts, built, ns, cfg.eval.k, 0, gen_kwargs, tmp_path, seed=int(cfg.seed),
                                   batch_prompts=int(cfg.eval.prompts_per_batch), log_samples=int(cfg.eval.log_samples))
        one = callback.evaluate(module)
    finally:
        torch.set_num_threads(threads)
    assert one["eval/prompts"] == 6
    compared = [k for k in one if k.startswith("eval/")]
    # bon/won x N x (rate, se) + kl, kl_k3, kl_calibrated, rewards, response lengths (policy, reference), prompts
    assert len(compared) == 4 * len(ns) + 8
    for k in compared:
        assert final[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k
    # the sample rows (eval_samples.jsonl): both processes' prompts gathered, in prompt order, as one process has them
    rows = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(callback.sample_rows) == 6  # eval.log_samples=8 of the 6 evaluation prompts
    for got, want in zip(rows, callback.sample_rows):
        assert got["iteration"] == 3
        for k, v in want.items():
            assert got[k] == (pytest.approx(v, rel=1e-9, abs=1e-12) if isinstance(v, float) else v), k


def test_a_sweep_refuses_several_processes(run_train, tmp_path):
    out = run_train("-m", "scale=smoke", "logger=none", "trainer=ddp", "trainer.devices=2", "seed=1,2",
                    f"hydra.sweep.dir={tmp_path}", check=False)
    assert out.returncode != 0 and "sweep with a shell loop" in out.stderr
    assert not list(tmp_path.glob("*/checkpoints"))
