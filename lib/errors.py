"""The three ways a job ends badly, each with its documented exit code.

These are plain exceptions, so the library can be used without the CLI (`import hfbatch`); the CLI turns them
into one-line Click errors in one place (`hfbatch.cli.LazyGroup.invoke`), and no traceback reaches the user.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 75  # EX_TEMPFAIL: cron may simply try again later


class HfbatchError(Exception):
    """An error the user can act on: one line naming the file, row, column or option and what to do."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InputError(HfbatchError):
    """Bad input or options: the user can fix it (exit 2)."""

    exit_code = EXIT_USAGE


class JobFailed(HfbatchError):
    """The job ran and failed (too many rejects, a model error, ...) (exit 1)."""

    exit_code = EXIT_FAILED


class Busy(HfbatchError):
    """Another run holds the output's lock (exit 75)."""

    exit_code = EXIT_BUSY
