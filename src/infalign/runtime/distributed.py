"""The few collectives the trainer needs outside Lightning's hooks (the calibration cache, split across ranks in
`LightningDataModule.setup`, where every Lightning strategy has made the default process group); outside a
distributed run they are the one-process case."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["rank_and_world", "all_gather_object", "broadcast_object", "barrier"]


def _on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _on() else (0, 1)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; small ones: they travel through one tensor)."""
    if not _on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not _on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _on():
        dist.barrier()
