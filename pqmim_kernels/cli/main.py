"""Entry point of the ``pqmim`` command.

Each sub-command lives in its own module of this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit code). Modules keep heavy imports (torch,
models, codecs) inside their functions so ``pqmim --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module name -> the sub-commands it registers (for the error message when one fails to import)
_SUBCOMMAND_MODULES = ("codec", "train", "eval", "perceptual", "refine")


def build_parser() -> argparse.ArgumentParser:
    from pqmim_kernels import __version__

    parser = argparse.ArgumentParser(
        prog="pqmim",
        description="PQ-MIM learned image compression: compress, decompress, train, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"pqmim-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"pqmim_kernels.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pqmim_kernels.cli.{name}":
                continue  # sub-command not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pqmim: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"pqmim {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # permissions, full disk, a folder where a file was expected ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pqmim {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"pqmim {args.command}: error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
