"""Command line: ``python -m transpeft_kernels COMMAND`` (also the ``transpeft`` script).

Without a command it runs DEFAULT_COMMAND. Expected failures (bad arguments, missing files) print one
line ``transpeft: error: ...`` and exit 2, without a traceback (TRANSPEFT_DEBUG=1 shows it).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .commands import bench, build_cuda, compile_check, demo, model, quickstart, train, transfer
from .commands import study
from .errors import UserError

COMMANDS = [demo, train, transfer, quickstart, bench, compile_check, build_cuda, model, study]
DEFAULT_COMMAND = demo.NAME




def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transpeft", description="Trans-PEFT training tools for transformers models.")
    sub = p.add_subparsers(dest="command")
    for cmd in COMMANDS:
        cmd.add_arguments(sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.HELP))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, DEFAULT_COMMAND)
    args = _parser().parse_args(argv)
    # transformers/PEFT deprecation chatter is not the user's business in a command-line run.
    warnings.filterwarnings("ignore", category=FutureWarning)
    command = next(c for c in COMMANDS if c.NAME == args.command)
    try:
        return command.run(args)
    except (UserError, ValueError, TypeError, RuntimeError, OSError) as e:
        # OSError: what the checks cannot foresee, such as a disk that fills up or a permission lost mid-run
        if os.environ.get("TRANSPEFT_DEBUG"):
            raise
        print(f"transpeft: error: {one_line(str(e))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    """``message`` on one line: line breaks and other unprintable characters (in a library's message, or in a
    path the user gave) are written as escapes, so the error stays one line and names the path unambiguously."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in message.strip())
