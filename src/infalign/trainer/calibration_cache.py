"""The calibration cache: M reference responses per prompt and their rewards, generated once.

The reference policy is frozen, so its samples and their rewards depend only on (reference model, reward model,
prompt set, M, generation config, seed): built once into the content-addressed cache (`infalign.runtime.artifacts`)
and reused by every run with the same key, as the calibration set of each training prompt and as the reference
side of the win-rate evaluation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from infalign.runtime import signals
from infalign.runtime.artifacts import get_or_build, lookup
from infalign.runtime.distributed import all_gather_object, barrier, broadcast_object, rank_and_world
from infalign.runtime.manifest import fingerprint
from infalign.runtime.seeds import derive_seed
from infalign.trainer.rollout import sample_and_score

log = logging.getLogger(__name__)

__all__ = ["CachedSamples", "ReferenceSamples", "load_or_build_reference_samples", "load_reference_samples"]

KIND = "reference_samples"  # cache kind: <cache_root>/reference_samples/<hash>/


@dataclass
class ReferenceSamples:
    prompt_ids: list[str]
    rewards: torch.Tensor  # [P, M] float32
    responses: list[list[str]]
    cache_path: Path | None = None
    cache_hit: bool = False
    # the sampled token ids of each response ([P, M, T] int32, padded after `response_lengths`; EOS included
    # where the sample ended by choice): the exact paths the reference drew. Decoded text re-encoded is not
    # always the same path (176 of 256 with the default tokenizer: `python bench/retokenisation.py`), and a path
    # the reference rarely draws is a different target for maximum likelihood. None in entries built before.
    response_tokens: torch.Tensor | None = None
    response_lengths: torch.Tensor | None = None  # [P, M] int32

    def __post_init__(self):
        self._row = {pid: i for i, pid in enumerate(self.prompt_ids)}

    @property
    def m(self) -> int:
        return self.rewards.shape[1]

    def responses_for(self, prompt_ids: list[str]) -> list[list[str]]:
        """The M response texts of each prompt, in the order asked."""
        self.rewards_for(prompt_ids)  # the same check
        return [self.responses[self._row[p]] for p in prompt_ids]

    def tokens_for(self, prompt_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`([len(prompt_ids), M, T] token ids, [len(prompt_ids), M] lengths)` of the sampled responses."""
        if self.response_tokens is None:
            raise RuntimeError(f"the reference samples at {self.cache_path} hold texts but not their sampled token "
                               "ids (an entry built by an older infalign); delete the entry and re-run to rebuild it")
        self.rewards_for(prompt_ids)  # the same check
        rows = [self._row[p] for p in prompt_ids]
        return self.response_tokens[rows], self.response_lengths[rows]

    def rewards_for(self, prompt_ids: list[str]) -> torch.Tensor:
        """`[len(prompt_ids), M]` reference rewards, in the order asked."""
        missing = [p for p in prompt_ids if p not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} prompt(s) are not in the calibration cache, e.g. {missing[0]}")
        return self.rewards[[self._row[p] for p in prompt_ids]]


class CachedSamples:
    """One cache entry's reference samples (the calibration cache, or distillation's pool) as one object, built
    once and handed to whoever reads them: `get()` loads or builds them on first use
    (`load_or_build_reference_samples` with these arguments), where under DDP every process and the process
    group exist (the DataModule's setup), and returns the same `ReferenceSamples` after."""

    def __init__(self, **kwargs):
        self.kwargs, self._samples = kwargs, None

    @classmethod
    def ready(cls, samples: ReferenceSamples) -> CachedSamples:
        """Samples already in hand (tests, benchmarks)."""
        out = cls()
        out._samples = samples
        return out

    def get(self) -> ReferenceSamples:
        if self._samples is None:
            self._samples = load_or_build_reference_samples(**self.kwargs)
        return self._samples


def load_reference_samples(path: Path, prompt_ids: list[str], m: int, hit: bool = True) -> ReferenceSamples:
    """Read a calibration-cache entry (already verified by the cache) and check it holds what was asked."""
    path = Path(path)
    rewards = load_file(str(path / "rewards.safetensors"))["rewards"]
    ids = json.loads((path / "prompt_ids.json").read_text())
    if ids != list(prompt_ids) or tuple(rewards.shape) != (len(prompt_ids), m):
        raise RuntimeError(f"calibration cache {path} does not match its key; delete it and re-run")
    responses = json.loads((path / "responses.json").read_text())
    tokens = lengths = None
    if (path / "response_tokens.safetensors").exists():
        stored = load_file(str(path / "response_tokens.safetensors"))
        tokens, lengths = stored["tokens"], stored["lengths"]
        if tuple(lengths.shape) != (len(prompt_ids), m) or tokens.shape[:2] != lengths.shape:
            raise RuntimeError(f"calibration cache {path}: response_tokens do not match its rewards; delete it and re-run")
    return ReferenceSamples(ids, rewards, responses, cache_path=path, cache_hit=hit, response_tokens=tokens,
                            response_lengths=lengths)


def load_or_build_reference_samples(*, cache_root, key: dict, prompt_ids: list[str], prompts: list[str],
                                    reward_prompts: list[str], reference, tokenizer, reward_model, m: int,
                                    gen_kwargs: dict, seed: int, prompts_per_batch: int = 8, progress: bool = True,
                                    stream: str = "calibration_cache", what: str = "calibration cache",
                                    ) -> ReferenceSamples:
    """Load the calibration cache for `key`, or generate and score `m` reference samples per prompt first.

    `prompts` are the policy's inputs, `reward_prompts` the same prompts as the reward model reads them.
    Distributed (a torch.distributed process group exists, as in `LightningDataModule.setup` under DDP):
    rank r generates batches r, r + W, r + 2W, ...; rank 0 gathers them and stores the entry once, the
    others wait at a barrier and load it. Each batch is seeded by its index, so the entry is the same
    whatever the number of processes (and the cache key rightly ignores it)."""
    rank, world = rank_and_world()
    # Rank 0 decides, so that every rank takes the same branch through the collectives below.
    entry = lookup(cache_root, KIND, key) if rank == 0 else None
    found = broadcast_object(entry is not None)
    if not found:
        starts = list(range(0, len(prompts), prompts_per_batch))

        def sample_my_share() -> dict[int, tuple[torch.Tensor, list[list[str]], torch.Tensor, torch.Tensor]]:
            done, sampled = {}, 0
            desc = f"{what}: {len(prompts)} prompts x M={m}" + (f", {world} processes" if world > 1 else "")
            for b in tqdm(range(rank, len(starts), world), desc=desc, disable=not progress or rank != 0):
                signals.progress(f"{sampled}/{len(prompts)} prompts")  # named if a stop signal lands now
                chunk = prompts[starts[b] : starts[b] + prompts_per_batch]
                reward_chunk = reward_prompts[starts[b] : starts[b] + prompts_per_batch]
                # each batch seeded: independent of batch order, resume and rank
                torch.manual_seed(derive_seed(seed, stream, b))
                scored = sample_and_score(reference, tokenizer, reward_model, chunk, reward_chunk, m, gen_kwargs,
                                          where=f"the {what}")
                r, texts = scored.rollout, scored.texts
                ids = r.response_ids.masked_fill(r.response_mask == 0, tokenizer.pad_token_id).cpu().to(torch.int32)
                done[b] = (scored.rewards.float().cpu(), [texts[i * m : (i + 1) * m] for i in range(len(chunk))],
                           ids, r.lengths.cpu().to(torch.int32))
                sampled += len(chunk) * world
            return done

        if rank == 0:
            gathered = False

            def build(out: Path) -> dict:  # inside get_or_build, so the manifest's build_seconds covers it all
                nonlocal gathered
                batches = {b: v for shard in all_gather_object(sample_my_share()) for b, v in shard.items()}
                gathered = True
                rewards, responses, tokens, lengths = zip(*(batches[b] for b in range(len(starts))))
                table = torch.cat(rewards).contiguous()
                width = max(t.shape[1] for t in tokens)  # batches end at different steps
                pad = int(tokenizer.pad_token_id)
                tokens = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in tokens])
                save_file({"rewards": table}, str(out / "rewards.safetensors"))
                save_file({"tokens": tokens.view(len(prompts), m, -1).contiguous(),
                           "lengths": torch.cat(lengths).view(len(prompts), m)},
                          str(out / "response_tokens.safetensors"))
                (out / "prompt_ids.json").write_text(json.dumps(prompt_ids))
                (out / "responses.json").write_text(json.dumps([r for chunk in responses for r in chunk]))
                return {"prompts": len(prompts), "m": m, "mean_reward": float(table.mean()), "processes": world}

            entry = get_or_build(cache_root, KIND, key, build, what=f"the {what}")  # temp dir + atomic rename: once
            if not gathered:  # another job stored the entry meanwhile: still meet the other ranks' gather
                all_gather_object({})
        else:
            all_gather_object(sample_my_share())
        barrier()  # the others load only once rank 0 has renamed the entry into place
    if entry is None:
        entry = lookup(cache_root, KIND, key)
    if entry is None:
        raise RuntimeError(f"calibration cache for {fingerprint(key)} missing after it was built (rank {rank}); "
                           "is cache_root on a file system every process shares?")
    samples = load_reference_samples(entry.path, prompt_ids, m, hit=found)
    log.info("%s %s: %s (%d prompts x M=%d)", what, "hit" if found else "built", entry.path,
             *samples.rewards.shape)
    return samples
