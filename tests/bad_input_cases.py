"""The bad-input table: what a user may type wrong, where it is refused, and the message's key text.

One table for the tests (tests/test_bad_input.py: in-process `run()` for every case, `python train.py` for the
schema's), the timing benchmark (bench/config_check_time.py) and docs/errors.md's "Errors you may see" table
(tests/test_bad_input.py checks that every case's `label` appears there). Pure Python: no torch.

`stage` says which check refuses it:
- "schema": `infalign.config.check.check_config`, which train.py applies before torch is imported (exit status 2,
  one line);
- "config": `infalign.config.check.check_targets`, in `run()` once torch is imported: the keys of the open sections
  (trainer, optimizer) against their classes' parameters, still before any model is built;
- "run": `run()`'s checks of the data and the run directory, before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    overrides: tuple[str, ...]  # on top of the smoke scale (tests/test_bad_input.py SMOKE)
    match: str  # regex the message must match: it names the key (and the value)
    stage: str = "schema"
    setup: str | None = None  # a function of tests/test_bad_input.py that breaks the run directory or the cache root
    label: str | None = None  # how docs/errors.md's table names the case; default: the overrides

    @property
    def name(self) -> str:
        return self.label or " ".join(self.overrides)


def case(*overrides: str, match: str, **kw) -> Case:
    return Case(tuple(overrides), match, **kw)


CASES = [
    # the method's numbers
    case("n=0", match=r"n must be a positive integer .*got 0; e.g. n=4"),
    case("n=2.5", match=r"n must be a positive integer .*got 2.5"),
    case("n=abc", match=r"n must be a positive integer .*got 'abc'"),
    case("beta=0", match=r"beta must be a positive finite number .*got 0; e.g. beta="),
    case("beta=-1", match=r"beta must be a positive finite number .*got -1"),
    case("seed=abc", match=r"seed must be an integer from 0 to 4294967295 .*got 'abc'; e.g. seed=0"),
    case("seed=-1", match=r"seed must be an integer from 0 to 4294967295 .*got -1"),
    case("transform=bon_exp", "transform.t=-1", match=r"transform.t must be auto or a positive finite number .*got -1"),
    case("transform=won_exp", "transform.t=-1", match=r"transform.t must be auto or a positive finite number .*got -1"),
    case("transform=raw", match=r"transform=raw and calibrator=empirical do not fit"),
    case("study=smoke", "method=bon_exp", "study.beta_index=5", match=r"beta cannot be resolved: .*index 5 is outside"),
    case("+foo=1", match=r"foo: unknown key in conf/train.yaml; known keys: .*beta"),
    # samples and sizes
    case("calibration.m=2", match=r"calibration.m=2 is below N=4"),
    case("eval.k=2", match=r"eval.k=2 is below N=4"),
    case("eval.ns=[0]", match=r"eval.ns must be a list of positive integers .*got \[0\]; e.g. eval.ns="),
    case("rl.k=1", match=r"rl.k must be an integer >= 2 .*got 1; e.g. rl.k=4"),
    case("rl.algo=dpo", match=r"rl.algo must be 'rloo' or 'ppo' .*got 'dpo'"),
    case("rl.minibatch_size=7", match=r"rl.minibatch_size must divide the rl.prompts_per_iteration x rl.k = 16 "
                                      r"sequences .*7 splits them into 3 steps\), got 7; e.g. rl.minibatch_size=4"),
    case("rl.prompts_per_iteration=20", match=r"rl.prompts_per_iteration=20 exceeds data.train_prompts=12"),
    case("trainer=ddp", "rl.prompts_per_iteration=3",
         match=r"rl.prompts_per_iteration=3 must be divisible by the 2 processes"),
    case("solver=distill", "distill.iterations=5",
         match=r"distill.iterations must be an integer from 0 to rl.iterations=3 .*got 5"),
    case("distill.iterations=2", match=r"distill.iterations=2 does nothing useful under solver=rloo, which does not "
                                       r"distil: .*solver=distill_rl"),
    case("generation.max_new_tokens=0", match=r"generation.max_new_tokens must be a positive integer .*got 0"),
    case("data.eval_partition=train", match=r"data.eval_partition must be a held-out partition"),
    case("+calibration.train_prompts=3", match=r"^calibration.train_prompts moved to data.train_prompts; "
                                                r"e.g. data.train_prompts=3$"),
    case("eval.every=-1", match=r"eval.every must be an integer >= 0 .*got -1"),
    # the optimizer and the schedule
    case("optimizer.lr=-1", match=r"optimizer.lr must be a positive finite number .*got -1; e.g. optimizer.lr="),
    case("optimizer.lr=0", match=r"optimizer.lr must be a positive finite number \(the learning rate; 0 would "
                                 r"train nothing\), got 0"),
    case("+rl.lr=1e-4", match=r"rl.lr: unknown key in the rl config .*; lr is set as optimizer.lr"),
    case("optimizer.betas=[0.9,1.5]", match=r"optimizer.betas must be a list of two numbers in \[0, 1\) .*got \[0.9, 1.5\]"),
    case("+optimizer.weight_decy=0.1", stage="config", match=r"optimizer.weight_decy: unknown key .*did you mean 'weight_decay'"),
    case("scheduler.warmup_steps=-1", match=r"scheduler.warmup_steps must be an integer >= 0 .*got -1"),
    case("rl.kl_penalty=loss", match=r"rl.kl_penalty must be 'reward' or 'exact' .*got 'loss'; e.g. rl.kl_penalty="),
    case("rl.target_kl=0", match=r"rl.target_kl must be null \(beta stays fixed\) or a positive finite number"),
    case("num_threads=0", match=r"num_threads must be null \(torch's default\) or a positive integer .*use null"),
    # sampling
    case("generation.temperature=0.7", match=r"generation.temperature must be 1.0 \(rollouts sample from the policy "
                                             r"itself.*\), got 0.7; e.g. generation.temperature=1.0"),
    case("generation.top_k=50", match=r"generation.top_k must be 0 \(or null\) \(rollouts sample from the policy itself"),
    case("generation.top_p=0.9", match=r"generation.top_p must be 1.0 \(or null\) \(rollouts sample from the policy itself"),
    case("+generation.sampler=multinomial", match=r"^generation.sampler was removed \(every token is drawn by "
                                                  r"inverse CDF, exactly from the policy\); drop it$"),
    case("+generation.repetition_penalty=1.3",
         match=r"generation.repetition_penalty: unknown key .*would change the sampling distribution"),
    case("+generation.max_new_token=5", match=r"generation.max_new_token: unknown key .*did you mean 'max_new_tokens'"),
    # the Lightning Trainer
    case("trainer.devices=0", match=r"trainer.devices must be a count >= 1, -1 or auto .*got 0"),
    case("trainer.precision=bf17", match=r"trainer.precision must be one of 32-true, bf16-mixed.*got 'bf17'"),
    case("trainer.max_epochs=5", match=r"trainer.max_epochs=5 differs from rl.iterations=3: set rl.iterations instead"),
    case("+trainer.max_steps=10", match=r"trainer.max_steps=10: it would change the number .*set rl.iterations instead"),
    case("+trainer.accumulate_grad_batches=2",
         match=r"trainer.accumulate_grad_batches=2: .*manual optimisation.*raise rl.minibatch_size"),
    case("+trainer.gradient_clip_val=1.0", match=r"trainer.gradient_clip_val=1.0: .*set rl.grad_clip instead"),
    case("+trainer.max_epoch=3", stage="config",
         match=r"trainer.max_epoch: unknown key in conf/trainer/default.yaml.*did you mean 'max_epochs'"),
    # the model and reward configs (their loaders' keys: infalign.config.models.LOADERS)
    case("+model.tokenzier=1",
         match=r"model.tokenzier: unknown key in conf/model/tiny.yaml .*; known keys: .*tokenizer"),
    case("+model.sft.lrr=1", match=r"model.sft.lrr: unknown key in conf/model/tiny.yaml .*known keys: .*lr"),
    case("+reward.bakbone=minilm",
         match=r"reward.bakbone: unknown key in conf/reward/trained.yaml .*; known keys: .*backbone"),
    case("model.prompt_format=plain", match=r"model.prompt_format must be 'raw' or 'chat' .*got 'plain'"),
    case("reward.backbone=bert", match=r"reward.backbone must be one of 'minilm', .*got 'bert'"),
    case("model=smollm2",  # the smoke scale's model keys are model=tiny's
         match=r"model.tokenizer: unknown key in conf/model/smollm2.yaml \(as composed with conf/scale/smoke"),
    # a model given by path (its folder: infalign.runtime.model_paths), refused before the smoke scale's model keys
    case("model=hf", "model.name_or_path=/nonexistent",
         match=r"^model.name_or_path=/nonexistent: no such local folder \(/nonexistent does not exist, relative to .*\); "
               r"a hub id looks like org/name"),
    case("model=hf", "model.tokenizer_name_or_path=/nonexistent",
         match=r"^model.tokenizer_name_or_path=/nonexistent: no such local folder"),
    case("reward=hf", "reward.name_or_path=/nonexistent", match=r"^reward.name_or_path=/nonexistent: no such local folder"),
    # the run directory and the data
    case("resume=maybe", match=r"resume must be true, false or auto .*got 'maybe'"),
    case("resume=true", "overwrite=true", match=r"resume and overwrite=true contradict each other"),
    case("checkpoint.every=-1", match=r"checkpoint.every must be an integer >= 0 .*got -1"),
    case("data.source=ftp", match=r"data.source must be one of 'local', 'hub', 'auto' .*got 'ftp'"),
    case("data.fractions={train:0.9,validation:0.2}", match=r"data.fractions must be a mapping of train, validation, "
         r"test to fractions >= 0 summing to 1 .*got \{'train': 0.9, 'validation': 0.2, 'test': 0.1\}"),
    case(setup="read_only_cache", label="an empty `cache_root` that cannot be written",
         match=r"^cannot write into the cache directory cache_root=\S+: Read-only file system \(EROFS\)\. Make \S+ "
               r"writable, or set cache_root=<a writable folder> \(or \$INFALIGN_CACHE\)"),
    case("data.root=/nonexistent", stage="run", match=r"no local file at /nonexistent.*data.root.*data.source=hub"),
    case("data.root=/nonexistent", "data.source=local", stage="run",
         match=r"not found: /nonexistent.*data.root.*data.source=hub"),
    case("resume=true", stage="run", match=r"resume=true but .*last.ckpt does not exist"),
    case(stage="run", setup="finished_run", label="a run directory holding another run",
         match=r"already holds a run's outputs .*resume=true.*overwrite=true"),
    case("resume=true", stage="run", setup="corrupt_checkpoint", label="a damaged `last.ckpt`",
         match=r"last.ckpt .*(corrupted or truncated|cannot be read).*overwrite=true"),
    case("resume=auto", stage="run", setup="malicious_checkpoint", label="a `last.ckpt` holding pickled objects",
         match=r"refusing to unpickle it"),
]

# Valid but pointless values the schema lets run, with a warning (`check_config` returns it; train.py logs it)
WARNINGS = [
    case("scheduler.warmup_steps=100", match=r"scheduler.warmup_steps=100 is not below the run's 6 optimizer steps"),
    case("rl.minibatch_size=16", match=r"rl.grad_noise_scale=true logs nothing: it needs >= 2 minibatches"),
    case("num_threads=4096", match=r"num_threads=4096 exceeds the \d+ CPU cores here"),
    case("resume_allow_changes=true", match=r"resume_allow_changes=true does nothing without resume"),
    case("solver=ppo", "model.lora.r=4", "model.lora.dropout=0.1",
         match=r"model.lora.dropout=0.1 with rl.algo=ppo: dropout in the update's passes perturbs PPO's"),
]

# Valid values that look pointless but are fine as they are: neither an error nor a warning
FINE = [
    case("eval.every=100", match=""),  # > rl.iterations: the final evaluation, which always runs
    case("eval.every=0", match=""),  # only the final evaluation
    case("checkpoint.every=100", match=""),  # the final checkpoint, which is always written
    case("rl.ppo_epochs=5", match=""),  # with rl.algo=rloo: unused (one pass), like rl.clip
    case("eval.log_samples=100", match=""),  # more than the evaluation prompts: all of them
]
