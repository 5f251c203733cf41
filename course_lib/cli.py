"""Command line: `python -m course_lib <command>` (also installed as `course`)."""
from __future__ import annotations

import argparse
import sys


def _doctor(args) -> int:
    from . import doctor

    return doctor.main()


def _release(args) -> int:
    from .release import release

    reports = release(args.src_dir, args.out_dir, force=args.force)
    for r in reports:
        print(r)
    print(f"Wrote {len(reports)} student notebook(s) to {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib",
                                     description="Tools for the hands-on diffusion course.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("doctor", help="check the installation, device, widgets, Triton and quick mode",
                       description="Print what is installed and which device the course uses; exit 0 when the course can run.")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("release", help="write student copies of the source notebooks",
                       description="Copy every notebook in SRC_DIR to OUT_DIR with solutions replaced by stubs, "
                                   "cells tagged hidden-tests removed and outputs cleared.")
    p.add_argument("src_dir", metavar="SRC_DIR", help="folder of source notebooks (with solutions)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the student notebooks")
    p.add_argument("--force", action="store_true", help="overwrite the student notebooks in a non-empty OUT_DIR")
    p.set_defaults(func=_release)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
