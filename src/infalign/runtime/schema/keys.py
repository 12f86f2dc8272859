"""The per-key table of the config schema (`KEYS`: each key's rule, meaning and example) and the tables of its
sections: the known top-level keys, the closed sections, each `_target_`'s keys, hints for misplaced keys,
retired values, the Trainer arguments infalign sets itself."""

from __future__ import annotations

from dataclasses import dataclass

from infalign.runtime.schema.rules import (
    ACCELERATORS,
    BOOL,
    INSTANTIATED,
    KL_PENALTY_MODES,
    PRECISIONS,
    RL_ALGOS,
    SAMPLERS,
    SEED,
    TARGET,
    TEXT,
    Rule,
    _devices,
    _fractions,
    _real,
    integer,
    list_of,
    nullable,
    number,
    one_of,
)


# ---------------------------------------------------------------------------------------------- the keys
@dataclass(frozen=True)
class Key:
    rule: Rule
    what: str  # what the key is, in the paper's vocabulary
    example: str  # a valid value as typed on the command line
    required: bool = True  # False: may be absent (the code has a default, or only some _target_s take it)


_TOKENS = integer(1)
_DECAY = number(ge=0, lt=1)
KEYS: dict[str, Key] = {
    # the method
    "n": Key(integer(1, integral_float=True), "the N of best-/worst-of-N; n=1 is the standard win rate", "4"),
    "beta": Key(number(gt=0), "the KL strength; with rl.target_kl its starting value", "0.05"),
    "seed": Key(SEED, "the run's seed; Lightning takes 0 to 2^32-1", "0"),
    "method": Key(TEXT, "the method preset's name, conf/method/", "bon_exp", required=False),
    "solver._target_": Key(TARGET, "the solver class, conf/solver/ (docs/solvers.md)",
                           "infalign.trainer.solvers.rloo.RLOO", required=False),
    # the run
    "cache_root": Key(TEXT, "the folder of built models and calibration caches", "/data/infalign-cache"),
    "resume": Key(one_of(True, False, "auto", text="true, false or auto"),
                  "continue hydra.run.dir's last checkpoint; auto: if there is one", "auto"),
    "overwrite": Key(BOOL, "start afresh in a run dir that holds a run's outputs", "true"),
    "resume_allow_changes": Key(BOOL, "let resume continue with a changed experiment", "true", required=False),
    "num_threads": Key(nullable(integer(1), "torch's default"),
                       "torch's CPU threads; 0 is no thread count: use null for torch's default", "2"),
    "progress": Key(BOOL, "the progress bar over the iterations", "false"),
    # rl: the policy-gradient solver
    "rl.algo": Key(one_of(*RL_ALGOS), "RLOO, or PPO-clip with several passes over a rollout", "rloo"),
    "rl.k": Key(integer(2), "samples per prompt; the leave-one-out baseline needs another sample", "4"),
    "rl.iterations": Key(integer(1), "RL iterations, one Lightning epoch each: the run's one count of iterations",
                         "30"),
    "rl.prompts_per_iteration": Key(integer(1), "prompts per rollout", "16"),
    "rl.minibatch_size": Key(integer(1), "sequences per optimizer step, over all processes", "32"),
    "rl.ppo_epochs": Key(integer(1), "passes over a rollout with rl.algo=ppo", "2"),
    "rl.clip": Key(number(gt=0), "PPO's clip range of the probability ratio, rl.algo=ppo", "0.2"),
    "rl.grad_clip": Key(nullable(number(ge=0), "no clipping"), "the gradient norm is clipped to it; 0: no clipping",
                        "1.0"),
    "rl.kl_penalty": Key(one_of(*KL_PENALTY_MODES),
                         "reward: k1 KL per sequence in the reward; exact: the full-vocabulary KL per token", "exact"),
    "rl.target_kl": Key(nullable(number(gt=0), "beta stays fixed"), "adapt beta towards this KL, nats per sequence",
                        "6.0"),
    "rl.null_control": Key(BOOL, "shuffle Phi within a prompt's samples: a control that learns nothing", "true"),
    "rl.grad_noise_scale": Key(BOOL, "log the gradient noise scale from the minibatch gradients", "false"),
    # distill: the distillation solver
    "distill.iterations": Key(integer(0), "solver=distill_rl: the first stage's iterations", "0"),
    "distill.m": Key(integer(2), "reference samples per training prompt in the pool; leave-one-out needs 2",
                     "64"),
    "distill.samples_per_prompt": Key(integer(1), "pool samples resampled per prompt and iteration", "4"),
    "distill.prompts_per_batch": Key(integer(1), "prompts per batch while building the pool", "8"),
    # the optimizer (torch.optim.AdamW unless _target_ names another)
    "optimizer._target_": Key(TARGET, "the optimizer class", "torch.optim.AdamW"),
    "optimizer._partial_": Key(one_of(True, text="true"), "the trainer calls it with the trainable parameters",
                               "true"),
    "optimizer.lr": Key(number(gt=0), "the learning rate; 0 would train nothing", "1e-4", required=False),
    "optimizer.betas": Key(Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(map(_DECAY.test, v)),
                                "a list of two numbers in [0, 1)"),
                           "Adam's decay rates of the gradient's moments", "[0.9,0.95]", required=False),
    "optimizer.eps": Key(number(gt=0), "Adam's denominator term", "1e-8", required=False),
    "optimizer.weight_decay": Key(number(ge=0), "decoupled weight decay", "0.01", required=False),
    # the learning-rate schedule (null: constant)
    "scheduler._target_": Key(TARGET, "the schedule factory", "infalign.trainer.schedules.warmup_cosine",
                              required=False),
    "scheduler.warmup_steps": Key(integer(0), "optimizer steps of linear warm-up", "5", required=False),
    "scheduler.final_lr_fraction": Key(number(ge=0, le=1), "the cosine's end, as a fraction of optimizer.lr",
                                       "0.1", required=False),
    # sampling (temperature, top_k, top_p: _pure_sampling below; other GenerationConfig fields: validate_config)
    "generation.max_new_tokens": Key(_TOKENS, "tokens per sampled response: rollouts, calibration cache, evaluation",
                                     "64"),
    "generation.sampler": Key(one_of(*SAMPLERS), "how a token is drawn, both exact", "inverse_cdf", required=False),
    "generation.cache_implementation": Key(nullable(TEXT, "the dynamic KV cache"), "transformers' KV-cache layout",
                                           "static", required=False),
    # the calibration cache
    "calibration.m": Key(integer(1), "reference samples per prompt, M: the calibrated reward's resolution is 1/M",
                         "16"),
    "calibration.train_prompts": Key(integer(1), "training prompts, a seeded subset of the train partition", "128"),
    "calibration.eval_prompts": Key(integer(1), "held-out prompts the win rates are measured on", "48"),
    "calibration.eval_partition": Key(one_of("validation", "test", text="a held-out partition, validation or test"),
                                      "where the evaluation prompts come from", "validation"),
    "calibration.seed": Key(SEED, "the seed of the prompt subset and the reference samples", "0"),
    "calibration.prompts_per_batch": Key(integer(1), "prompts per batch while sampling the cache", "8"),
    # evaluation
    "eval.every": Key(integer(0), "iterations between evaluations; 0: only the final one, which always runs", "15"),
    "eval.ns": Key(list_of(integer(1, integral_float=True), "positive integers"),
                   "the N of best-/worst-of-N evaluated; the run's n is always added", "[1,2,4,8]"),
    "eval.k": Key(integer(1), "policy samples per evaluation prompt, at least the largest N", "16"),
    "eval.prompts_per_batch": Key(integer(1), "evaluation prompts per batch", "8"),
    "eval.log_samples": Key(integer(0), "evaluation prompts whose responses are logged; 0 = off", "8",
                            required=False),
    "checkpoint.every": Key(integer(0), "iterations between checkpoints; 0: only at the end and on a stop signal",
                            "5"),
    # data
    "data.root": Key(TEXT, "the folder of <subset>/<split>.jsonl.gz files", "/data/hh-rlhf"),
    "data.source": Key(one_of("local", "hub", "auto"), "where the pairs are read; auto: local if the file exists",
                       "auto"),
    "data.revision": Key(nullable(TEXT, "the hub's default"), "the hub dataset's revision", "main", required=False),
    "data.subsets": Key(list_of(TEXT, "subset names", nonempty=True), "HH-RLHF subsets read", "[harmless-base]"),
    "data.split": Key(TEXT, "the split file read", "test"),
    "data.fractions": Key(Rule(_fractions, "a mapping of train, validation, test to fractions >= 0 summing to 1"),
                          "the partition by prompt", "{train:0.8,validation:0.1,test:0.1}", required=False),
    "data.seed": Key(SEED, "the seed of the partition by prompt", "0"),
    "data.max_prompt_tokens": Key(_TOKENS, "prompts are cut from the left to this many tokens", "192"),
    "data.max_response_tokens": Key(_TOKENS, "the models' training truncation; changing it rebuilds them", "64"),
    "data.limit": Key(nullable(integer(0), "all"), "pairs read per subset; 0: all", "160", required=False),
    # the Lightning Trainer (iterations, gradient clipping and accumulation: the cross rules below)
    "trainer._target_": Key(TARGET, "the trainer class", "lightning.Trainer"),
    "trainer.accelerator": Key(Rule(lambda v: v in ACCELERATORS or INSTANTIATED.test(v),
                                    f"one of {', '.join(ACCELERATORS)}"), "the device kind", "cpu", required=False),
    "trainer.devices": Key(Rule(_devices, "a count >= 1, -1 or auto (all), or a list of device indices"),
                           "processes per node", "1", required=False),
    "trainer.num_nodes": Key(integer(1), "nodes", "1", required=False),
    "trainer.precision": Key(one_of(*PRECISIONS, text=f"one of {', '.join(map(str, PRECISIONS[:8]))}, or "
                                                      "Lightning's aliases 32, 16, bf16, 64"),
                             "how Lightning computes the policy's update", "bf16-mixed", required=False),
    "trainer.strategy": Key(Rule(lambda v: TEXT.test(v) or INSTANTIATED.test(v), "a name or a mapping with _target_"),
                            "how processes share the work", "ddp", required=False),
    "trainer.log_every_n_steps": Key(integer(1), "steps between logged rows", "1", required=False),
    "trainer.num_sanity_val_steps": Key(integer(-1), "Lightning's sanity check, unused here", "0", required=False),
    "trainer.enable_model_summary": Key(BOOL, "Lightning's model summary", "false", required=False),
    # transforms: the keys their factories take (conf/transform/)
    "transform.t": Key(Rule(lambda v: v == "auto" or (_real(v) and v > 0), "auto or a positive finite number"),
                       "the exp transform's t; auto: the t infalign.theory picks for n and beta", "4", required=False),
    "transform.target_kl": Key(nullable(number(gt=0), "the KL of the optimum at beta"), "the KL that t=auto tunes for",
                               "0.5", required=False),
    "transform.n": Key(integer(1, integral_float=True), "the N the transform is built for", "4", required=False),
    "transform.beta": Key(number(gt=0), "the beta the transform is built for", "0.05", required=False),
    "transform.mode": Key(one_of("bon", "won"), "best-of-N or worst-of-N", "bon", required=False),
    "transform.m": Key(nullable(integer(1), "continuous u"), "the calibration's M", "16", required=False),
    "transform.eps": Key(number(gt=0), "the floor of log(u)", "1e-3", required=False),
}

# Sections whose keys are all known: a key outside them is a typo (it would be dropped, or fail after the models
# were built). `generation` is open here: its other keys are GenerationConfig fields, checked by validate_config.
# `model` and `reward` are checked against their loader's signature by validate_config.
TOP_LEVEL = ("n", "beta", "seed", "method", "solver", "cache_root", "resume", "overwrite", "resume_allow_changes",
             "num_threads", "progress", "rl", "distill", "optimizer", "scheduler", "generation", "calibration", "eval",
             "checkpoint", "data", "model", "reward", "calibrator", "transform", "trainer", "logger", "study", "hydra")
CLOSED = ("rl", "distill", "calibration", "eval", "checkpoint", "data")
# Sections whose keys depend on `_target_`: {section: {target: its keys}}; an unlisted target is not checked.
TARGET_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "optimizer": {  # torch's signatures (tests/test_config.py compares them)
        "torch.optim.AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                              "differentiable", "fused"),
        "torch.optim.Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "maximize", "capturable",
                             "differentiable", "fused", "decoupled_weight_decay"),
    },
    "scheduler": {"infalign.trainer.schedules.warmup_cosine": ("warmup_steps", "final_lr_fraction")},
    "transform": {
        "infalign.theory.factories.bon_exp": ("t", "n", "beta", "target_kl"),
        "infalign.theory.factories.won_exp": ("t", "n", "beta", "target_kl"),
        "infalign.theory.factories.optimal": ("n", "mode", "beta"),
        "infalign.core.transforms.LogTransform": ("m", "eps"),
        "infalign.core.transforms.IdentityTransform": (),
        "infalign.core.transforms.RawTransform": (),
    },
    "trainer": {  # lightning.Trainer's parameters (Lightning 2.6; tests/test_config.py compares them)
        target: ("accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
                 "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
                 "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches",
                 "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
                 "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches",
                 "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode",
                 "use_distributed_sampler", "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm",
                 "reload_dataloaders_every_n_epochs", "default_root_dir", "enable_autolog_hparams", "model_registry")
        for target in ("lightning.Trainer", "lightning.pytorch.Trainer")
    },
}
# Where a misplaced key belongs: `+rl.lr=1e-4` is meant as optimizer.lr
HINTS = {"lr": "optimizer.lr", "learning_rate": "optimizer.lr", "weight_decay": "optimizer.weight_decay",
         "betas": "optimizer.betas", "epochs": "rl.iterations", "max_epochs": "rl.iterations",
         "batch_size": "rl.minibatch_size", "max_new_tokens": "generation.max_new_tokens", "seed": "seed"}
# Values that once meant something, with why they are gone
RETIRED = {
    ("rl.kl_penalty", "loss"): "rl.kl_penalty=loss (k3 per token in the loss) is gone: its fixed point is not the "
    "tilted reference pi_ref exp(Phi/beta). Use rl.kl_penalty=exact (the full-vocabulary KL per token in the loss, "
    "with the KL still to come in the advantage) or reward (k1 per sequence in the reward)",
}
# Trainer arguments `infalign.trainer.run.run` passes itself, which would silently replace the config's
SET_BY_RUN = {"logger": "the logger group (logger=wandb or logger=none)", "callbacks": "infalign's own callbacks",
              "enable_progress_bar": "progress=true|false", "default_root_dir": "hydra.run.dir",
              "use_distributed_sampler": "infalign's sampler, which shards each iteration's prompts",
              "plugins": "infalign's checksummed checkpoint I/O", "enable_checkpointing": "checkpoint.every"}
# Transforms that read the raw reward, and calibrators that calibrate it (the classes' needs_calibration /
# needs_reference; tests/test_config.py compares them)
RAW_TRANSFORMS = ("infalign.core.transforms.RawTransform",)
CALIBRATORS = {"infalign.core.calibration.EmpiricalCalibrator": True, "infalign.core.calibration.PassThroughCalibrator": False}
