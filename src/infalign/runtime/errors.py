"""The user's errors (`UserError`: what the user, not the program, has to fix; its message is one line naming the key
or file, what is wrong and the fix): `ConfigError`, a refused input, and `infalign.runtime.atomic.FileWriteError`, a
write that failed for a full disk or a read-only folder; and how every entry point reports one
(`exit_on_user_error`). Stdlib only: imported before torch, by every layer."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["ConfigError", "UserError", "exit_on_user_error"]


class UserError(Exception):
    """An error the user fixes: an entry point prints its one-line message, exit status 2 (`exit_on_user_error`)."""


class ConfigError(UserError, ValueError):
    """A config value refused: one line naming the key, what is allowed, the value and an example."""


def exit_on_user_error(e: UserError) -> NoReturn:
    """How an entry point reports a refused input: one line `error: ...` on stderr and exit status 2, as for a
    command-line usage error (no traceback: Hydra would print its shortened one above the message). With
    HYDRA_FULL_ERROR=1 the error is raised again, for the whole traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
