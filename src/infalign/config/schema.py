"""Every key of `python train.py`'s config, once: its type, default, range and meaning, as dataclasses.

`TrainConfig` holds the keys with one value for every run (n, beta, rl, optimizer, ...); its defaults are the
base of `conf/train.yaml` (stored in Hydra's ConfigStore as `base_train`, see `infalign.config`). The config
groups' own files (conf/data, conf/trainer, conf/model, conf/reward, conf/transform, conf/calibrator) hold their
values; their keys are defined here without a default (`opt`: the key may be absent), one dataclass per group or,
for the groups that name a function in `_target_`, per function: the keys a config of it may hold.
Each field's metadata: `rule` (infalign.config.rules), `help` (one line), `example` (a valid command-line value);
`section`: the dataclass of a nested mapping.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

from infalign.config.rules import (
    ANY,
    BOOL,
    INSTANTIATED,
    SEED,
    TARGET,
    TEXT,
    Rule,
    cli,
    devices,
    fractions,
    integer,
    is_real,
    list_of,
    nullable,
    number,
    one_of,
)


def key(rule: Rule, help: str, example: Any = MISSING, *, default: Any = MISSING, opt: bool = False):
    """A key: without `default`, set by its group's file (and required unless `opt`)."""
    meta = {"rule": rule, "help": help, "opt": opt,
            "example": cli(default if example is MISSING else example)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def sub(section: type, help: str, *, nullable: bool = False, opt: bool = False, default: bool = False):
    """A nested mapping of `section`'s keys (`nullable`: null switches it off)."""
    meta = {"section": section, "help": help, "nullable": nullable, "opt": opt}
    return field(default_factory=section, metadata=meta) if default else field(default=MISSING, metadata=meta)


_PARTIAL = one_of(True, text="true")


@dataclass(kw_only=True)
class RLConfig:
    algo: str = key(one_of("rloo", "ppo"), "RLOO, or PPO-clip with several passes over a rollout", default="rloo")
    k: int = key(integer(2), "samples per prompt; the leave-one-out baseline needs another sample", default=4)
    iterations: int = key(integer(1), "RL iterations, one Lightning epoch each: the run's one count of iterations",
                          default=30)
    prompts_per_iteration: int = key(integer(1), "prompts per rollout", default=16)
    minibatch_size: int = key(integer(1), "sequences per optimizer step, over all processes", default=32)
    ppo_epochs: int = key(integer(1), "passes over a rollout with rl.algo=ppo", default=2)
    clip: float = key(number("(0, inf)"), "PPO's clip range of the probability ratio, rl.algo=ppo", default=0.2)
    grad_clip: float | None = key(nullable(number("[0, inf)"), "no clipping"),
                                  "the gradient norm is clipped to it; 0: no clipping", default=1.0)
    kl_penalty: str = key(one_of("reward", "exact"), "reward: k1 KL per sequence in the reward; exact: the "
                          "full-vocabulary KL per token in the loss", "exact", default="reward")
    target_kl: float | None = key(nullable(number("(0, inf)"), "beta stays fixed"),
                                  "adapt beta towards this KL, nats per sequence", 6.0, default=None)
    null_control: bool = key(BOOL, "shuffle Phi within a prompt's samples: a control that learns nothing",
                             default=False)
    grad_noise_scale: bool = key(BOOL, "log the gradient noise scale (needs >= 2 minibatches per rollout)",
                                 default=True)


@dataclass(kw_only=True)
class DistillConfig:
    iterations: int = key(integer(0), "the iterations that distil (of rl.iterations): solver=distill_rl's first "
                          "stage; solver=distill sets rl.iterations", default=0)
    m: int = key(integer(2), "reference samples per training prompt in the pool; leave-one-out needs 2", default=64)
    samples_per_prompt: int = key(integer(1), "pool samples resampled per prompt and iteration", default=4)
    prompts_per_batch: int = key(integer(1), "prompts per batch while building the pool", default=8)
    minibatch_size: int = key(integer(1), "sequences per distillation step, over all processes", 64,
                              default="${rl.minibatch_size}")


@dataclass(kw_only=True)
class OptimizerConfig:  # open: the class's other parameters are checked against it once torch is imported
    _target_: str = key(TARGET, "the optimizer class", default="torch.optim.AdamW")
    _partial_: bool = key(_PARTIAL, "the trainer calls it with the trainable parameters", default=True)
    lr: float = key(number("(0, inf)"), "the learning rate; 0 would train nothing", "1e-4", default=1.0e-4)
    betas: list = key(Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(number("[0, 1)").test(x) for x in v),
                           "a list of two numbers in [0, 1)"), "Adam's decay rates of the gradient's moments",
                      default=[0.9, 0.95], opt=True)
    weight_decay: float = key(number("[0, inf)"), "decoupled weight decay", default=0.0, opt=True)
    open: ClassVar[bool] = True


@dataclass(kw_only=True)
class SchedulerConfig:
    _target_: str = key(TARGET, "the schedule factory", default="infalign.trainer.schedules.warmup_cosine")
    _partial_: bool = key(_PARTIAL, "called with the optimizer", default=True)
    warmup_steps: int = key(integer(0), "optimizer steps of linear warm-up from 0", 5, default=0, opt=True)
    final_lr_fraction: float = key(number("[0, 1]"), "the cosine's end, a fraction of optimizer.lr (1: constant)",
                                   default=1.0, opt=True)
    open: ClassVar[bool] = True


_NEUTRAL = ("rollouts sample from the policy itself: the KL estimate and the policy gradient assume it, and the "
            "calibration samples and evaluation sample the same way")


@dataclass(kw_only=True)
class GenerationConfig:
    max_new_tokens: int = key(integer(1), "tokens per sampled response: rollouts, calibration cache, evaluation",
                              default=64)
    temperature: float = key(Rule(lambda v: is_real(v) and v == 1, "1.0"), _NEUTRAL, default=1.0)
    top_k: int | None = key(Rule(lambda v: v is None or is_real(v) and v == 0, "0 (or null)"), _NEUTRAL, default=0)
    top_p: float | None = key(Rule(lambda v: v is None or is_real(v) and v == 1, "1.0 (or null)"), _NEUTRAL,
                              default=1.0)
    sampler: str = key(one_of("inverse_cdf", "multinomial"), "how a token is drawn, both exactly from the policy: "
                       "inverse_cdf (fastest) or multinomial (generate's own draws)", default="inverse_cdf", opt=True)
    cache_implementation: str | None = key(nullable(TEXT, "the dynamic KV cache"), "transformers' KV-cache layout",
                                           "static", default=None, opt=True)


@dataclass(kw_only=True)
class CalibrationConfig:
    m: int = key(integer(1), "reference samples per prompt, M: the calibrated reward's resolution is 1/M; >= max N",
                 default=16)
    seed: int = key(SEED, "the seed of the reference samples (and the training-prompt subset)", default=0)
    prompts_per_batch: int = key(integer(1), "prompts per batch while sampling the cache", default=8)


@dataclass(kw_only=True)
class EvalConfig:
    every: int = key(integer(0), "iterations between evaluations; 0: only the final one, which always runs",
                     default=15)
    ns: list = key(list_of(integer(1, integral_float=True), "positive integers"),
                   "the N of best-/worst-of-N evaluated; the run's n is always added", default=[1, 2, 4, 8])
    k: int = key(integer(1), "policy samples per evaluation prompt, at least the largest N", default=16)
    prompts_per_batch: int = key(integer(1), "evaluation prompts per batch", default=8)
    log_samples: int = key(integer(0), "evaluation prompts whose responses are logged (eval_samples.jsonl); 0 = off",
                           default=8, opt=True)
    held_in_prompts: int = key(integer(0), "training prompts evaluated too, a fixed seeded subset (calibration.seed), "
                               "logged as eval_held_in/*; 0 = off; at most data.train_prompts", 48, default=0,
                               opt=True)


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = key(integer(0), "iterations between checkpoints; 0: only at the end and on a stop signal", default=5)


@dataclass(kw_only=True)
class TrainConfig:
    """The keys of every run (conf/train.yaml's base); the groups' keys follow."""
    n: int = key(integer(1, integral_float=True), "the N of best-/worst-of-N; n=1 is the standard win rate", default=4)
    beta: float = key(number("(0, inf)"), "the KL strength; with rl.target_kl its starting value", default=0.1)
    seed: int = key(SEED, "the run's seed; Lightning takes 0 to 2^32-1", default=0)
    cache_root: str = key(TEXT, "built models and calibration caches ($INFALIGN_CACHE, else <repo>/.cache)",
                          "/data/infalign-cache", default="${infalign.cache_root:}")
    resume: Any = key(one_of(True, False, "auto", text="true, false or auto"),
                      "continue hydra.run.dir's last checkpoint; auto: if there is one", "auto", default=False)
    overwrite: bool = key(BOOL, "start afresh in a run dir that holds a run's outputs (deleted first)", True,
                          default=False)
    resume_allow_changes: bool = key(BOOL, "let resume continue with a changed experiment (recorded)", True,
                                     default=False, opt=True)
    num_threads: int | None = key(nullable(integer(1), "torch's default"),
                                  "torch's CPU threads; 0 is no thread count: use null for torch's default", 2,
                                  default=None)
    progress: bool = key(BOOL, "progress bars over the iterations and the builds", False, default=True)
    rl: RLConfig = sub(RLConfig, "the policy-gradient solver", default=True)
    distill: DistillConfig = sub(DistillConfig, "the distillation solver: the first iterations fit the tilt by "
                                 "weighted maximum likelihood on reference samples", default=True)
    optimizer: OptimizerConfig = sub(OptimizerConfig, "the policy's optimizer, a partial", default=True)
    scheduler: SchedulerConfig | None = sub(SchedulerConfig, "the learning-rate schedule; null: constant",
                                            nullable=True, default=True)
    generation: GenerationConfig = sub(GenerationConfig, "sampling: rollouts, reference samples, evaluation",
                                       default=True)
    calibration: CalibrationConfig = sub(CalibrationConfig, "the calibration cache", default=True)
    eval: EvalConfig = sub(EvalConfig, "the win-rate evaluation", default=True)
    checkpoint: CheckpointConfig = sub(CheckpointConfig, "checkpoints/last.ckpt", default=True)


# ---------------------------------------------------------------------------------------------- the groups' keys
@dataclass(kw_only=True)
class DataConfig:  # conf/data/
    root: str = key(TEXT, "the folder of <subset>/<split>.jsonl.gz files", "/data/hh-rlhf")
    source: str = key(one_of("local", "hub", "auto"), "where the pairs are read; auto: local if the file exists",
                      "auto")
    revision: str | None = key(nullable(TEXT, "the hub's default"), "the hub dataset's revision", "main", opt=True)
    subsets: list = key(list_of(TEXT, "subset names", nonempty=True), "HH-RLHF subsets read", "[harmless-base]")
    split: str = key(TEXT, "the split file read", "test")
    fractions: dict = key(Rule(fractions, "a mapping of train, validation, test to fractions >= 0 summing to 1"),
                          "the partition by prompt", "{train:0.8,validation:0.1,test:0.1}", opt=True)
    seed: int = key(SEED, "the seed of the partition by prompt", 0)
    max_prompt_tokens: int = key(integer(1), "prompts are cut from the left to this many tokens", 192)
    max_response_tokens: int = key(integer(1), "the models' training truncation; changing it rebuilds them", 64)
    limit: int | None = key(nullable(integer(0), "all"), "pairs read per subset; 0: all", 160, opt=True)
    train_prompts: int = key(integer(1), "training prompts, a seeded subset (calibration.seed) of the train partition",
                             128)
    eval_prompts: int = key(integer(1), "held-out prompts the win rates are measured on", 48)
    eval_partition: str = key(one_of("validation", "test", text="a held-out partition, validation or test"),
                              "where the evaluation prompts come from", "validation")


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64", 32, 16, 64)  # Lightning's, aliases last


@dataclass(kw_only=True)
class TrainerConfig:  # conf/trainer/; open: Lightning's other parameters are checked against lightning.Trainer
    _target_: str = key(TARGET, "the trainer class", "lightning.Trainer")
    accelerator: str = key(Rule(lambda v: v in ("auto", "cpu", "gpu", "cuda", "mps", "tpu") or INSTANTIATED.test(v),
                                "one of auto, cpu, gpu, cuda, mps, tpu"), "the device kind", "cpu", opt=True)
    devices: Any = key(Rule(devices, "a count >= 1, -1 or auto (all), or a list of device indices"),
                       "processes per node", 1, opt=True)
    num_nodes: int = key(integer(1), "nodes", 1, opt=True)
    precision: Any = key(one_of(*PRECISIONS, text=f"one of {', '.join(map(str, PRECISIONS[:8]))}, or Lightning's "
                                "aliases 32, 16, bf16, 64"), "how Lightning computes the policy's update",
                         "bf16-mixed", opt=True)
    strategy: Any = key(Rule(lambda v: TEXT.test(v) or INSTANTIATED.test(v), "a name or a mapping with _target_"),
                        "how processes share the work", "ddp", opt=True)
    max_epochs: Any = key(ANY, "${rl.iterations}: one epoch per RL iteration", "${rl.iterations}", opt=True)
    log_every_n_steps: int = key(integer(1), "steps between logged rows", 1, opt=True)
    num_sanity_val_steps: int = key(integer(-1), "Lightning's sanity check, unused here", 0, opt=True)
    enable_model_summary: bool = key(BOOL, "Lightning's model summary", False, opt=True)
    open: ClassVar[bool] = True


# transforms (conf/transform/) and calibrators (conf/calibrator/): the keys of each class; RAW: raw rewards
@dataclass(kw_only=True)
class ExpTransform:
    t: Any = key(Rule(lambda v: v == "auto" or (is_real(v) and v > 0), "auto or a positive finite number"),
                 "the exp transform's t; auto: the t infalign.theory picks for n and beta", 4, opt=True)
    n: int = key(integer(1, integral_float=True), "the N it is built for", "${n}", opt=True)
    beta: float = key(number("(0, inf)"), "the beta it is built for", "${beta}", opt=True)
    target_kl: float | None = key(nullable(number("(0, inf)"), "the KL of the optimum at beta"),
                                  "the KL t=auto tunes for", 0.5, opt=True)


@dataclass(kw_only=True)
class OptimalTransform:
    n: int = key(integer(1, integral_float=True), "the N it is built for", "${n}", opt=True)
    mode: str = key(one_of("bon", "won"), "best-of-N or worst-of-N", "bon", opt=True)
    beta: float = key(number("(0, inf)"), "the beta it is built for", "${beta}", opt=True)


@dataclass(kw_only=True)
class LogTransform:
    m: int | None = key(nullable(integer(1), "continuous u"), "the calibration's M", "${calibration.m}", opt=True)
    eps: float = key(number("(0, inf)"), "the floor of log(u)", 1e-3, opt=True)


@dataclass(kw_only=True)
class NoKeys:  # a transform or calibrator that takes no key
    pass


_T = "infalign.theory.factories."
TRANSFORMS = {_T + "bon_exp": ExpTransform, _T + "won_exp": ExpTransform, _T + "optimal": OptimalTransform,
              "infalign.core.transforms.LogTransform": LogTransform,
              "infalign.core.transforms.IdentityTransform": NoKeys, "infalign.core.transforms.RawTransform": NoKeys}
CALIBRATORS = {"infalign.core.calibration.EmpiricalCalibrator": NoKeys,
               "infalign.core.calibration.PassThroughCalibrator": NoKeys}
RAW = ("infalign.core.transforms.RawTransform", "infalign.core.calibration.PassThroughCalibrator")  # go together
