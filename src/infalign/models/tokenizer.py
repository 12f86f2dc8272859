"""Byte-level BPE tokenizer for the embedded default models, trained on the training partition only.

Byte-level BPE never produces unknown tokens and decodes back to the exact input text, which the RL stage
relies on (responses are sampled as ids, scored as text). Wrapped as a ``PreTrainedTokenizerFast`` so the
rest of the code can treat it like any hub tokenizer, and cached by :mod:`infalign.runtime.artifacts`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from infalign.models.data import PARTITION_SOURCES, PreferenceRecord
from infalign.runtime.artifacts import get_or_build
from infalign.runtime.manifest import CacheEntry

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# A pad token distinct from EOS: SFT masks pad positions out of the loss by id, and with pad == eos the
# model would never be trained to emit EOS, so generations would not stop.
PAD = "<|pad|>"


def training_texts(records: Iterable[PreferenceRecord]) -> list[str]:
    """Each distinct prompt once, plus every chosen and rejected response."""
    seen, texts = set(), []
    for r in records:
        if r.prompt_id not in seen:
            seen.add(r.prompt_id)
            texts.append(r.prompt)
        texts.extend((r.chosen, r.rejected))
    return texts


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols + 2 specials, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a response " Sure" must encode the same alone and after its prompt
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",  # decoder-only generation needs prompts right-aligned
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
        model_max_length=1_000_000,  # the model's n_positions is the real limit; truncation is ours
    )


def tokenizer_key(tok_cfg: Mapping, partition_fp: str) -> dict:
    return {"kind": "bpe", "vocab_size": int(tok_cfg.get("vocab_size", 8192)),
            "min_frequency": int(tok_cfg.get("min_frequency", 2)), "data": partition_fp, "version": 1}


def load_or_train_tokenizer(tok_cfg: Mapping, train_records: list[PreferenceRecord],
                            partition_fp: str, cache_root: str | Path | None = None,
                            ) -> tuple[PreTrainedTokenizerFast, CacheEntry]:
    """The cached tokenizer for this config and data partition, training it first if missing."""
    key = tokenizer_key(tok_cfg, partition_fp)

    def build(out: Path) -> dict:
        log.info("training byte-level BPE (vocab %d) on %d training pairs", key["vocab_size"], len(train_records))
        tok = train_bpe_tokenizer(training_texts(train_records), key["vocab_size"], key["min_frequency"])
        tok.save_pretrained(out)
        return {"vocab_size": len(tok)}

    entry = get_or_build(cache_root, "tokenizer", key, build,
                         sources={"vocab_size": "model.tokenizer.vocab_size",
                                  "min_frequency": "model.tokenizer.min_frequency", "data": PARTITION_SOURCES})
    return load_tokenizer(entry.path), entry


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok
