"""`python -m infalign.study <sweep dir> [KL ...] [--archive DIR]`: write the study tables and figures of a sweep.

KL values (nats) after the directory set the matched-KL comparison points; without them the sweep's
`study.matched_kl`, else three values over the KL range every method covers.

--archive DIR: first copy every finished member's data files (final metrics, config, per-prompt table, metrics
log) into DIR/<member>/ (infalign.study.archive: never overwriting a member archived from another run), then
write the tables and figures of DIR, every member archived there so far. DIR is meant to be committed
(docs/<study>/), so a study run in parts over several machines keeps its members.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from infalign.study.archive import archive_members
from infalign.study.cli import cli_parser, print_paths
from infalign.study.report import write_study
from infalign.study.runs import sweep_problem


def main(argv: list[str]) -> int:
    parser = cli_parser("python -m infalign.study", __doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (hydra.sweep.dir of `train.py -m`)")
    parser.add_argument("kls", type=float, nargs="*", metavar="KL", help="matched-KL comparison points (nats)")
    parser.add_argument("--archive", type=Path, metavar="DIR", help="archive the finished members into DIR, "
                        "then write the tables and figures of DIR")
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad input
    if problem := sweep_problem(args.sweep_dir):  # before anything is read or written
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # stderr: a skipped member's warning among them
    sweep_dir = args.sweep_dir
    if args.archive is not None:
        try:
            archive_members(sweep_dir, args.archive)
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"archive: {e}", file=sys.stderr)
            return 2
        sweep_dir = args.archive
    # FileNotFoundError: every finished member skipped as damaged (each named above), or none evaluated
    return print_paths(lambda: write_study(sweep_dir, args.kls or None))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
