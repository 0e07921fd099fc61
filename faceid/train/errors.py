"""The one exception type for mistakes a user can fix (bad index, missing file, wrong flag combination).

The scripts' :func:`faceid.cli.run` prints its message (which says what to do) and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from faceid.errors import InputError


class TrainingInputError(InputError):
    """A problem with the data, files or flags given to training; the message names it and what to do."""


def run_cli(main, parse_args, argv=None) -> int:
    """:func:`faceid.cli.run` returning the exit status instead of exiting (for in-process tests)."""
    from faceid.cli import run

    try:
        run(main, parse_args, argv)
    except SystemExit as done:
        return done.code
    return 0
