"""Subcommands of ``python -m transpeft_kernels``. Each module defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; cli.py lists them in COMMANDS."""
