"""User-facing errors.

Anything raised as `LdmkitError` is a problem with the user's input (a file, a config, a
checkpoint), not a bug: the CLI prints its message as one line on stderr and exits non-zero.
Messages say what is wrong and what to do about it.
"""


class LdmkitError(Exception):
    """A problem the user can fix; printed as one line by the CLI."""


class TrainingInterrupted(LdmkitError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (exit code 130)."""
