"""Is a model's `name_or_path` a local folder, a hub id, or neither? Checked before anything loads.

Given a path that does not exist, transformers takes it for a hub id and fails four tracebacks deep about the
characters a repository id may hold; `model_path_problem` says what is wrong in one line, without torch or
transformers, so the config check can call it in milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["PATH_KEYS", "model_path_problem"]

PATH_KEYS = ("name_or_path", "tokenizer_name_or_path")  # a hub id or a local folder, wherever a loader takes one
# A hub id: `name` or `org/name`, each starting with a letter or digit, then letters, digits, `_`, `-` and `.`
# (huggingface_hub's validate_repo_id, less its rarer rules); anything else can only be a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def model_path_problem(key: str, value: Any) -> str | None:
    """Why ``value`` of ``key`` (``model.name_or_path``, ...) names no usable model, or None.

    A value that exists as a folder is a local model (``name_or_path`` must hold ``config.json``, as
    ``save_pretrained`` writes it). One that looks like a path (starts with ``/``, ``.`` or ``~``, has more than
    one ``/``, or is no hub id at all) and does not exist is a missing folder. Anything else is left to the hub."""
    if not isinstance(value, str) or not value or value == "???":
        return None  # unset or not text: the required-key and type checks say so
    path = Path(value).expanduser()
    shown = f"{key}={value}"
    if path.is_dir():
        if key.rsplit(".", 1)[-1] == "name_or_path" and not (path / "config.json").is_file():
            return (f"{shown}: the folder {path.resolve()} holds no config.json, so it is not a saved transformers "
                    "model; point it at the folder save_pretrained wrote (the one with config.json and the weights)")
        return None
    looks_local = (value.startswith(("/", ".", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)
                   or not _HUB_ID.fullmatch(value))
    if not looks_local:
        return None
    if path.exists():
        return f"{shown}: {path.resolve()} is a file; a local model is the folder save_pretrained wrote"
    return (f"{shown}: no such local folder ({path.resolve()} does not exist, relative to {Path.cwd()}); "
            "a hub id looks like org/name (e.g. openai-community/gpt2)")
