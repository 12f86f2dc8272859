"""Every key of `python train.py`'s config, once: its rule (type and range), one-line meaning and value.

`RUN`'s values are the run's defaults, the base of conf/train.yaml (`base_train`); `DATA` and `TRAINER`'s are
examples, since a group's file sets its own keys (the groups a `_target_` builds: `infalign.config.models`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from infalign.config.rules import Rule, cli, device_count, integer, is_real, list_of, nullable, one_of, real


class Key(NamedTuple):
    """`value`: the run's default, or a group key's example; `example`: a command-line value where the default is
    none; `req`: a group's key that its file must set (a run's keys are always set)."""
    rule: Rule
    help: str
    value: Any
    example: Any = None
    req: bool = False

    @property
    def shown(self) -> str:
        return cli(self.value if self.example is None else self.example)


class Section(NamedTuple):
    """A nested mapping of `keys` (`nullable`: null switches it off)."""
    help: str
    keys: dict
    nullable: bool = False
    req: bool = False


def defaults(keys: dict) -> dict:
    return {name: defaults(k.keys) if isinstance(k, Section) else k.value for name, k in keys.items()}


def fractions(v) -> bool:
    return isinstance(v, dict) and set(v) <= {"train", "validation", "test"} and all(
        is_real(x) and x >= 0 for x in v.values()) and abs(sum(v.values()) - 1) <= 1e-6


def instantiated(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("_target_"), str)


POSITIVE = real(lambda v: v > 0, "a positive finite number")
NONNEGATIVE = real(lambda v: v >= 0, "a number >= 0")
DROPOUT = real(lambda v: 0 <= v < 1, "a number in [0, 1)")
BOOL = one_of(True, False, text="true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
SEED = integer(0, 2**32 - 1)  # Lightning's seed_everything replaces a seed outside it by 0, with a warning
N = real(lambda v: v >= 1 and float(v).is_integer(), "a positive integer")  # 4.0 too: the theory takes floats
TARGET = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"[\w.]+", v) is not None, "a dotted import path")
NEUTRAL = "rollouts sample from the policy itself, as the KL estimate, the policy gradient and the calibration assume"

RL = {
    "algo": Key(one_of("rloo", "ppo"), "RLOO, or PPO-clip with several passes over a rollout", "rloo"),
    "k": Key(integer(2), "samples per prompt; the leave-one-out baseline needs another sample", 4),
    "iterations": Key(integer(1), "RL iterations, one Lightning epoch each: the run's one count of iterations", 30),
    "prompts_per_iteration": Key(integer(1), "prompts per rollout", 16),
    "minibatch_size": Key(integer(1), "sequences per optimizer step, over all processes", 32),
    "ppo_epochs": Key(integer(1), "passes over a rollout with rl.algo=ppo", 2),
    "clip": Key(POSITIVE, "PPO's clip range of the probability ratio, rl.algo=ppo", 0.2),
    "grad_clip": Key(nullable(NONNEGATIVE, "no clipping"), "the gradient norm is clipped to it; 0: no clipping", 1.0),
    "kl_penalty": Key(one_of("reward", "exact"), "reward: k1 KL per sequence in the reward; exact: the "
                      "full-vocabulary KL per token in the loss", "reward"),
    "target_kl": Key(nullable(POSITIVE, "beta stays fixed"), "adapt beta to this KL, nats per sequence", None, 6.0),
    "null_control": Key(BOOL, "shuffle Phi within a prompt's samples: a control that learns nothing", False),
    "grad_noise_scale": Key(BOOL, "log the gradient noise scale (needs >= 2 minibatches per rollout)", True),
}

DISTILL = {
    "iterations": Key(integer(0), "how many of the first rl.iterations distil (distill_rl: half; distill: all)", 0),
    "m": Key(integer(2), "reference samples per training prompt in the pool; leave-one-out needs 2", 64),
    "samples_per_prompt": Key(integer(1), "pool samples resampled per prompt and iteration", 4),
    "prompts_per_batch": Key(integer(1), "prompts per batch while building the pool", 8),
    "minibatch_size": Key(integer(1), "sequences per distillation step over all processes", "${rl.minibatch_size}", 64),
}

OPTIMIZER = {  # open: its class's other parameters are checked against it once torch is imported
    "_target_": Key(TARGET, "the optimizer class", "torch.optim.AdamW"),
    "_partial_": Key(one_of(True), "the trainer calls it with the trainable parameters", True),
    "lr": Key(POSITIVE, "the learning rate; 0 would train nothing", 1.0e-4),
    "betas": Key(Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(map(DROPOUT.test, v)), "a list of two "
                      "numbers in [0, 1)"), "Adam's decay rates of the gradient's moments", [0.9, 0.95]),
    "weight_decay": Key(NONNEGATIVE, "decoupled weight decay", 0.0),
}

SCHEDULER = {  # open, as the optimizer
    "_target_": Key(TARGET, "the schedule factory", "infalign.trainer.schedules.warmup_cosine"),
    "_partial_": Key(one_of(True), "called with the optimizer", True),
    "warmup_steps": Key(integer(0), "optimizer steps of linear warm-up from 0", 0),
    "final_lr_fraction": Key(real(lambda v: 0 <= v <= 1, "a number in [0, 1]"), "the cosine's end, a fraction of "
                             "optimizer.lr (1: constant)", 1.0),
}

GENERATION = {
    "max_new_tokens": Key(integer(1), "tokens per sampled response: rollouts, calibration cache, evaluation", 64),
    "temperature": Key(real(lambda v: v == 1, "1.0"), NEUTRAL, 1.0),
    "top_k": Key(Rule(lambda v: v is None or is_real(v) and v == 0, "0 (or null)"), NEUTRAL, 0),
    "top_p": Key(Rule(lambda v: v is None or is_real(v) and v == 1, "1.0 (or null)"), NEUTRAL, 1.0),
}

CALIBRATION = {
    "m": Key(integer(1), "reference samples per prompt, M: the calibrated reward's resolution is 1/M; >= max N", 16),
    "seed": Key(SEED, "the seed of the reference samples (and the training-prompt subset)", 0),
    "prompts_per_batch": Key(integer(1), "prompts per batch while sampling the cache", 8),
}

EVAL = {
    "every": Key(integer(0), "iterations between evaluations; 0: only the final one, which always runs", 15),
    "ns": Key(list_of(N, "positive integers"), "the N of best-/worst-of-N evaluated; the run's n is always added",
              [1, 2, 4, 8]),
    "k": Key(integer(1), "policy samples per evaluation prompt, at least the largest N", 16),
    "prompts_per_batch": Key(integer(1), "evaluation prompts per batch", 8),
    "log_samples": Key(integer(0), "evaluation prompts whose responses are logged (eval_samples.jsonl); 0 = off", 8),
    "held_in_prompts": Key(integer(0), "training prompts evaluated too, a fixed seeded subset (calibration.seed), "
                           "logged as eval_held_in/*; 0 = off; at most data.train_prompts", 0),
}

RUN = {
    "n": Key(N, "the N of best-/worst-of-N; n=1 is the standard win rate", 4),
    "beta": Key(POSITIVE, "the KL strength; with rl.target_kl its starting value", 0.1),
    "seed": Key(SEED, "the run's seed; Lightning takes 0 to 2^32-1", 0),
    "cache_root": Key(TEXT, "built models and calibration caches ($INFALIGN_CACHE, else <repo>/.cache)",
                      "${infalign.cache_root:}", "/data/infalign-cache"),
    "resume": Key(one_of(True, False, "auto", text="true, false or auto"), "continue hydra.run.dir's last checkpoint; "
                  "auto: if there is one", False),
    "overwrite": Key(BOOL, "start afresh in a run dir that holds a run's outputs (deleted first)", False),
    "resume_allow_changes": Key(BOOL, "let resume continue with a changed experiment (recorded)", False),
    "num_threads": Key(nullable(integer(1), "torch's default"), "torch's CPU threads; 0 is no thread count: use null "
                       "for torch's default", None, 2),
    "progress": Key(BOOL, "progress bars over the iterations and the builds", True),
    "rl": Section("the policy-gradient solver", RL),
    "distill": Section("the distillation solver: the tilt fit by weighted maximum likelihood on reference samples",
                       DISTILL),
    "optimizer": Section("the policy's optimizer, a partial", OPTIMIZER),
    "scheduler": Section("the learning-rate schedule; null: constant", SCHEDULER, nullable=True),
    "generation": Section("sampling: rollouts, reference samples, evaluation", GENERATION),
    "calibration": Section("the calibration cache", CALIBRATION),
    "eval": Section("the win-rate evaluation", EVAL),
    "checkpoint": Section("checkpoints/last.ckpt", {
        "every": Key(integer(0), "iterations between checkpoints; 0: only at the end and on a stop signal", 5)}),
}

# ---------------------------------------------------------------------------------------------- the groups' keys
DATA = {
    "root": Key(TEXT, "the folder of <subset>/<split>.jsonl.gz files", "/data/hh-rlhf", req=True),
    "source": Key(one_of("local", "hub", "auto"), "where the pairs are read; auto: local if the file exists", "auto",
                  req=True),
    "revision": Key(nullable(TEXT, "the hub's default"), "the hub dataset's revision", "main"),
    "subsets": Key(list_of(TEXT, "subset names", nonempty=True), "HH-RLHF subsets read", "[harmless-base]", req=True),
    "split": Key(TEXT, "the split file read", "test", req=True),
    "fractions": Key(Rule(fractions, "a mapping of train, validation, test to fractions >= 0 summing to 1"),
                     "the partition by prompt", "{train:0.8,validation:0.1,test:0.1}"),
    "seed": Key(SEED, "the seed of the partition by prompt", 0, req=True),
    "max_prompt_tokens": Key(integer(1), "prompts are cut from the left to this many tokens", 192, req=True),
    "max_response_tokens": Key(integer(1), "the models' training truncation; changing it rebuilds them", 64, req=True),
    "limit": Key(nullable(integer(0), "all"), "pairs read per subset; 0: all", 160),
    "train_prompts": Key(integer(1), "training prompts, a seeded subset (calibration.seed) of the train partition", 128,
                         req=True),
    "eval_prompts": Key(integer(1), "held-out prompts the win rates are measured on", 48, req=True),
    "eval_partition": Key(one_of("validation", "test", text="a held-out partition, validation or test"),
                          "where the evaluation prompts come from", "validation", req=True),
}

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64", 32, 16, 64)  # Lightning's, aliases last

TRAINER = {  # open: Lightning's other parameters are checked against lightning.Trainer once torch is imported
    "_target_": Key(TARGET, "the trainer class", "lightning.Trainer", req=True),
    "accelerator": Key(Rule(lambda v: v in ("auto", "cpu", "gpu", "cuda", "mps", "tpu") or instantiated(v), "one of "
                            "auto, cpu, gpu, cuda, mps, tpu"), "the device kind", "cpu"),
    "devices": Key(Rule(lambda v: device_count(v) != 0, "a count >= 1, -1 or auto (all), or a list of device "
                        "indices"), "processes per node", 1),
    "num_nodes": Key(integer(1), "nodes", 1),
    "precision": Key(one_of(*PRECISIONS, text=f"one of {', '.join(PRECISIONS[:8])}, or Lightning's aliases 32, 16, "
                            "bf16, 64"), "how Lightning computes the policy's update", "bf16-mixed"),
    "strategy": Key(Rule(lambda v: TEXT.test(v) or instantiated(v), "a name or a mapping with _target_"),
                    "how processes share the work", "ddp"),
    "max_epochs": Key(Rule(lambda v: True, "anything"), "one epoch per RL iteration", "${rl.iterations}"),
    "log_every_n_steps": Key(integer(1), "steps between logged rows", 1),
    "num_sanity_val_steps": Key(integer(-1), "Lightning's sanity check, unused here", 0),
    "enable_model_summary": Key(BOOL, "Lightning's model summary", False),
}
