"""Small file helpers shared by every script: atomic writes so that nothing already written is ever corrupted."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ip_adapter.utils import atomic_path  # the one atomic-write rule, shared with weight I/O

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "first_value", "resolve_path"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def first_value(record: dict, keys):
    """The value of the first of ``keys`` present in ``record`` and neither None nor ``""`` (index readers accept
    several spellings of a field)."""
    for key in keys:
        value = record.get(key)
        if value is not None and not (isinstance(value, str) and value == ""):
            return value
    return None


def resolve_path(base: str | os.PathLike, path) -> str | None:
    """``path`` (``~`` expanded) made absolute against ``base`` unless it already is; None/"" stay None."""
    if path is None or path == "":
        return None
    path = os.path.expanduser(os.fspath(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(os.fspath(base), path))
