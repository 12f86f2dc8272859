"""`python -m infalign.study.collect DIR [DIR ...] --out OUT`: one orderings.csv and one solver_efficiency.csv for
several studies (each DIR a study already written by `python -m infalign.study`, e.g. docs/study_shape and the
lever studies beside it): the rows of each DIR's tables in the order given, solver_efficiency.csv with a first
column `study` (the DIR's name; orderings.csv's `config` already names it). OUT/orderings.csv and
OUT/solver_efficiency.csv are replaced atomically; nothing is computed here."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from infalign.runtime.atomic import atomic_write_csv
from infalign.study.cli import cli_parser, print_paths
from infalign.study.orderings import COLUMNS as ORDERING_COLUMNS


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def collect(dirs: list[Path], out: Path) -> dict[str, Path]:
    """Concatenate the studies' tables into `out` (module docstring); FileNotFoundError names a DIR that has none."""
    orderings, efficiency, columns = [], [], ["study"]
    for d in dirs:
        for name in ("orderings.csv", "solver_efficiency.csv"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} does not exist: write the study first (python -m infalign.study {d})")
        orderings += _rows(d / "orderings.csv")[1]
        fields, rows = _rows(d / "solver_efficiency.csv")
        columns += [c for c in fields if c not in columns]
        efficiency += [{"study": d.name, **r} for r in rows]
    paths = {"orderings": out / "orderings.csv", "efficiency": out / "solver_efficiency.csv"}
    atomic_write_csv(paths["orderings"], orderings, ORDERING_COLUMNS)
    atomic_write_csv(paths["efficiency"], efficiency, columns)
    return paths


def main(argv: list[str]) -> int:
    parser = cli_parser("python -m infalign.study.collect", __doc__)
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="studies written by python -m infalign.study")
    parser.add_argument("--out", type=Path, required=True, help="the folder of the combined tables (e.g. docs)")
    args = parser.parse_args(argv)
    return print_paths(lambda: collect(args.dirs, args.out))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
