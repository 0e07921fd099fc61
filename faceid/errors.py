"""The base exception for input a user can fix (a missing folder, a flag combination, a rerun with other
arguments, a missing optional dependency). Library code raises it (or a subclass) with a message that names the
item and what to do; the scripts' :func:`faceid.cli.run` prints that message and exits with status 2, without a
traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input or set-up a user can fix; the message says what is wrong and what to do."""
