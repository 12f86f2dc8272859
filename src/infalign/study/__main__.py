"""`python -m infalign.study <sweep dir> [KL ...]`: write the study tables and figures of a finished sweep.

KL values (nats) after the directory set the matched-KL comparison points; without them the sweep's
`study.matched_kl`, else three values over the KL range every method covers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from infalign.study.report import write_study


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    sweep_dir = Path(argv[0])
    if not sweep_dir.is_dir():
        print(f"{sweep_dir} is not a directory (expected a sweep directory, e.g. outputs/multirun/<time>)",
              file=sys.stderr)
        return 2
    try:
        kls = [float(x) for x in argv[1:]] or None
    except ValueError:
        print(f"KL values must be numbers, got {argv[1:]}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in write_study(sweep_dir, kls).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
