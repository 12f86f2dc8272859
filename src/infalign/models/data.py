"""HH-RLHF preference pairs: loading, prompt/response splitting, the by-prompt partition.

Every stage (tokenizer, SFT reference, reward model, calibration, RL) calls :func:`load_partitions` with the
same ``cfg.data`` and therefore sees the same train / validation / test partition; its
:func:`partition_fingerprint` goes into every cache key built from the data.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infalign.runtime import signals
from infalign.runtime.errors import ConfigError
from infalign.runtime.manifest import fingerprint
from infalign.runtime.paths import data_root as default_data_root

log = logging.getLogger(__name__)

HUB_DATASET = "Anthropic/hh-rlhf"
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
PARTITIONS = ("train", "validation", "test")


# The data's errors are the user's (the message names the file, what is wrong and the fix): ConfigError, which
# every entry point prints as one line `error: ...` (exit status 2; the traceback with HYDRA_FULL_ERROR=1).
class DataNotFoundError(ConfigError, FileNotFoundError):
    """Neither the local copy nor the hub dataset could be read."""


class DataFileError(ConfigError):
    """A local data file that cannot be read to its end: truncated, corrupted, not UTF-8, unreadable."""


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str  # the dialogue up to and including the last "\n\nAssistant:"
    chosen: str  # preferred response text (usually starts with a space)
    rejected: str  # dispreferred response text
    prompt_id: str  # stable hash of the prompt: groups duplicates, keys partitions and caches


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def split_dialogue(text: str) -> tuple[str, str]:
    """Split at the last ``"\\n\\nAssistant:"``: ``(prompt including the marker, response)``."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in dialogue")
    i += len(ASSISTANT)
    return text[:i], text[i:]


def parse_pair(raw: Mapping[str, Any]) -> PreferenceRecord | str:
    """A :class:`PreferenceRecord`, or the reason (a short string) why the raw pair is malformed."""
    chosen, rejected = raw.get("chosen"), raw.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "missing_field"
    try:
        p_c, r_c = split_dialogue(chosen)
        p_r, r_r = split_dialogue(rejected)
    except ValueError:
        return "no_assistant_turn"
    # Broken turn markers ("  Human:" without the blank line) move the last Assistant turn to different
    # places in the two dialogues; such a pair does not compare two answers to one prompt.
    if p_c != p_r:
        return "prompt_mismatch"
    if not r_c.strip() or not r_r.strip():
        return "empty_response"
    if r_c.strip() == r_r.strip():
        return "identical_responses"  # carries no preference signal
    return PreferenceRecord(prompt=p_c, chosen=r_c, rejected=r_r, prompt_id=prompt_id(p_c))


def parse_pairs(raws: Iterable[Mapping[str, Any]], source: str = "") -> tuple[list[PreferenceRecord], Counter]:
    """Parse raw pairs, returning the good records and a Counter of drop reasons (also logged)."""
    records, dropped, n = [], Counter(), 0
    for n, raw in enumerate(raws, 1):  # noqa: B007 (n counts the records; read after the loop)
        out = parse_pair(raw)
        if isinstance(out, str):
            dropped[out] += 1
        else:
            records.append(out)
    if dropped:
        log.warning("%s: dropped %d of %d malformed pairs: %s", source or "data", sum(dropped.values()), n,
                    ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())))
    else:
        log.info("%s: parsed %d pairs, none dropped", source or "data", n)
    return records, dropped


# ---------------------------------------------------------------------------------------------- reading
def _local_file(root: Path, subset: str, split: str) -> Path | None:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (p := root / subset / name).is_file():
            return p
    return None


def _read_error(path: Path, lineno: int, e: Exception) -> DataFileError:
    """What went wrong reading `path`, in words, with where and what to do (gzip and zlib name no file)."""
    if isinstance(e, EOFError):
        cause = "it is truncated: the compressed stream ends before its end marker"
    elif isinstance(e, gzip.BadGzipFile):
        cause = f"it is not a gzip file ({e})"
    elif isinstance(e, zlib.error):
        cause = f"its compressed data is corrupted ({e})"
    elif isinstance(e, UnicodeDecodeError):
        cause = f"it is not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason})"
    elif isinstance(e, OSError) and e.strerror:
        cause = e.strerror.lower()
    else:
        cause = f"{type(e).__name__}: {e}"
    where = f"after line {lineno}" if lineno else "at its start"
    return DataFileError(
        f"data file {path} cannot be read {where}: {cause}. Replace it by a complete copy (the upstream file of "
        f"anthropics/hh-rlhf; `gzip -t {path}` tests a .gz file), point data.root (or $INFALIGN_DATA_ROOT) at "
        f"another copy, or use data.source=hub")


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows, lineno = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 (lineno: where a read error struck)
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    # A bad line is a malformed record: counted as such, not fatal.
                    log.warning("%s:%d: invalid JSON (%s)", path, lineno, e.msg)
                    rows.append({})
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as e:
        # a half-read file is never used: its partition (and every cache key built on it) would silently differ
        raise _read_error(path, lineno, e) from None
    return rows


def _read_hub(subset: str, split: str, limit: int | None, revision: str | None) -> list[dict]:
    import datasets  # heavy import, only when the hub is actually used

    ds = datasets.load_dataset(HUB_DATASET, data_dir=subset, split=split, revision=revision)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in ds]


def read_raw_pairs(data_cfg: Mapping[str, Any]) -> list[tuple[str, list[dict]]]:
    """``[(source_name, raw_rows)]`` for every configured subset, from the local root or the hub.

    ``source``: ``local`` (only the local root), ``hub`` (only ``datasets``), ``auto`` (local when the file
    exists, else hub). ``limit`` caps the rows read per subset (tiny test configs).
    """
    source = data_cfg.get("source", "auto")
    root = Path(str(data_cfg.get("root") or default_data_root())).expanduser()
    split = data_cfg.get("split", "test")
    subsets = list(data_cfg.get("subsets", ["harmless-base"]))
    limit = data_cfg.get("limit")
    limit = None if limit in (None, 0) else int(limit)
    out = []
    for subset in subsets:
        path = _local_file(root, subset, split) if source != "hub" else None
        if path is not None:
            out.append((str(path), _read_jsonl(path, limit)))
            continue
        local_hint = f"{root}/{subset}/{split}.jsonl.gz"
        if source == "local":
            raise DataNotFoundError(
                f"HH-RLHF file not found: {local_hint}. Either put the upstream files there (or set "
                f"data.root / $INFALIGN_DATA_ROOT to a folder laid out as <subset>/<split>.jsonl.gz), or use "
                f"data.source=hub to load '{HUB_DATASET}' with `datasets` (needs network access).")
        try:
            rows = _read_hub(subset, split, limit, data_cfg.get("revision"))
        except Exception as e:  # offline, unknown split, no credentials, ...
            raise DataNotFoundError(
                f"could not read HH-RLHF subset '{subset}' split '{split}': no local file at {local_hint} "
                f"(set data.root or $INFALIGN_DATA_ROOT to a folder laid out as <subset>/<split>.jsonl.gz), "
                f"and loading the hub dataset '{HUB_DATASET}' (data.source=hub) failed: "
                f"{type(e).__name__}: {e}") from e
        out.append((f"hub:{HUB_DATASET}/{subset}/{split}", rows))
    return out


# ------------------------------------------------------------------------------------------- partition
def partition_by_prompt(records: list[PreferenceRecord], fractions: Mapping[str, float],
                        seed: int) -> dict[str, list[PreferenceRecord]]:
    """Deterministic seeded train/validation/test cut in which no prompt lands in two partitions.

    Unique prompt ids are ordered by ``sha256(seed:prompt_id)`` (a seeded shuffle that does not depend on
    file order or Python's hash seed) and cut at the cumulative fractions; every record follows its prompt.
    """
    fr = {k: float(fractions.get(k, 0.0)) for k in PARTITIONS}  # checked with the config (infalign.config.schema)
    ids = sorted({r.prompt_id for r in records},
                 key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    n = len(ids)
    n_train = round(fr["train"] * n)
    n_val = round((fr["train"] + fr["validation"]) * n) - n_train
    assign = {pid: ("train" if i < n_train else "validation" if i < n_train + n_val else "test")
              for i, pid in enumerate(ids)}
    parts: dict[str, list[PreferenceRecord]] = {k: [] for k in PARTITIONS}
    for r in records:  # keep file order inside each partition
        parts[assign[r.prompt_id]].append(r)
    return parts


def load_partitions(data_cfg: Mapping[str, Any]) -> dict[str, list[PreferenceRecord]]:
    """Read, parse and partition the configured data: ``{"train": [...], "validation": [...], "test": [...]}``."""
    records = []
    with signals.stage("reading the data"):
        raw = read_raw_pairs(data_cfg)
    for source, rows in raw:
        recs, _ = parse_pairs(rows, source)
        records.extend(recs)
    if not records:
        raise ValueError("no valid preference pairs were read; check data.root / data.subsets / data.split")
    parts = partition_by_prompt(records, data_cfg.get("fractions", {"train": 0.8, "validation": 0.1, "test": 0.1}),
                                int(data_cfg.get("seed", 0)))
    log.info("partition (by prompt, seed %s): %s", data_cfg.get("seed", 0),
             ", ".join(f"{k}={len(v)}" for k, v in parts.items()))
    return parts


# What a partition fingerprint depends on, as named in cache-rebuild messages (infalign.runtime.artifacts)
PARTITION_SOURCES = ("the data partition: data.subsets, split, fractions, seed, limit (data.root, source and "
                     "revision only where the texts differ)")


def partition_fingerprint(parts: Mapping[str, list[PreferenceRecord]]) -> str:
    """Stable hash of the partition contents (texts and assignment), for cache keys."""
    h = hashlib.sha256()
    for name in PARTITIONS:
        h.update(f"[{name}]".encode())
        for r in parts.get(name, []):
            h.update(fingerprint([r.prompt, r.chosen, r.rejected], length=0).encode())
    return h.hexdigest()[:16]


