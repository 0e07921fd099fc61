"""The one exception type for mistakes a user can fix (bad index, missing file, wrong flag combination).

``train_instantId_sdxl.py`` and ``precompute_cache.py`` print its message (which says what to do) and exit with
status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TrainingInputError(ValueError):
    """A problem with the data, files or flags given to training; the message names it and what to do."""


def run_cli(main, parse_args, argv=None, prog: str = "train") -> int:
    """``main(parse_args(argv))``; a :class:`TrainingInputError` becomes a message on stderr and status 2."""
    import sys

    try:
        main(parse_args(argv))
    except TrainingInputError as exc:
        print(f"[{prog}] error: {exc}", file=sys.stderr)
        return 2
    return 0
