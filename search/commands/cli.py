"""The ``kdsearch`` command line: train, teacher, tune, reproduce, analyze, run, bench.

Every command takes ``--data`` (default ``$KDSEARCH_DATA`` or ``cifar10``); commands that
write results take ``--storage`` (``$KDSEARCH_STORAGE`` or ``./kdsearch-results``) and
``--study``. Bad input prints one line on stderr and exits with status 2; heavy imports
(torch, Ray) happen only inside the command that needs them: each command is one module of
``search.commands`` with a ``cmd_<command>(args)``, imported when it runs.
"""

from __future__ import annotations

import importlib
import sys

from search.commands.parser import GROUP_CHOICES, Default, build_parser

__all__ = ["GROUP_CHOICES", "Default", "build_parser", "main"]

COMMANDS = ("train", "teacher", "tune", "reproduce", "analyze", "run", "bench", "compact",
            "pack", "models")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"search.commands.{args.command}")
    try:
        return getattr(module, f"cmd_{args.command}")(args) or 0
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        print(f"kdsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
