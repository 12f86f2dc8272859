"""The user's errors: `ConfigError` (a refused input: one line naming the key or file, what is wrong and the fix) and
how every entry point reports it (`exit_on_user_error`). Stdlib only: imported before torch, by every layer."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["ConfigError", "exit_on_user_error"]


class ConfigError(ValueError):
    """A config value refused: one line naming the key, what is allowed, the value and an example."""


def exit_on_user_error(e: ConfigError) -> NoReturn:
    """How an entry point reports a refused input: one line `error: ...` on stderr and exit status 2, as for a
    command-line usage error (no traceback: Hydra would print its shortened one above the message). With
    HYDRA_FULL_ERROR=1 the error is raised again, for the whole traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
