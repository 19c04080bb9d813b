"""The three ways a job ends badly, each with its documented exit code.

They are ClickExceptions so Click prints one line and exits with the code; no traceback reaches the user.
"""

import click

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 75  # EX_TEMPFAIL: cron may simply try again later


class InputError(click.ClickException):
    """Bad input or options: the user can fix it (exit 2)."""

    exit_code = EXIT_USAGE


class JobFailed(click.ClickException):
    """The job ran and failed (too many rejects, a model error, ...) (exit 1)."""

    exit_code = EXIT_FAILED


class Busy(click.ClickException):
    """Another run holds the output's lock (exit 75)."""

    exit_code = EXIT_BUSY
