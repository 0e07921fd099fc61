"""Small file helpers shared by every script: atomic writes so that nothing already written is ever corrupted."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on POSIX).

    On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
