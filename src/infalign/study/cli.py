"""What the study CLIs share: their parser and their ending. Stdlib only, so that any study module can use it
without importing the analysis (tilt_fit's CLI did, through the report, which imports tilt_fit back)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["cli_parser", "print_paths"]


def cli_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A study CLI's parser: its module docstring's first paragraph as the description, the rest as the epilog."""
    description, _, epilog = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def print_paths(write) -> int:
    """The study CLIs' ending: call `write()` (returns {name: path}) and print one line per file, exit status 0;
    a FileNotFoundError (no study to read: its message names the folder and the fix) is one `error:` line, 2."""
    try:
        paths = write()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
