"""Errors shared across layers."""


class UserError(Exception):
    """An error in what the user asked for (a path, a file's contents, a setting). The command line
    reports it in one line and exits with status 2."""
