"""The ``ditas`` command line: one subcommand per pipeline step.

Each subcommand lives in its own module ``ditas.cli.<name>`` exposing
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``. Errors that a user
can fix are raised as ``ditas.errors.DitasError`` and printed as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import DitasError

SUBCOMMANDS = ("sample", "train", "eval", "quantize", "compare", "benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditas",
        description="Data-free W4A8 quantization of Diffusion Transformers (DiTAS).")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"ditas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"ditas.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        from ..versions import check_versions

        check_versions()  # an old torch or diffusers: one line now, not a traceback after the work
        return int(args._run(args) or 0)
    except DitasError as exc:
        print(f"ditas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditas {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
