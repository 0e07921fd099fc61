"""Small file helpers shared by every script: atomic writes so that nothing already written is ever corrupted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

# the one atomic-write rule (umask-respecting modes, disk-full errors naming the file), shared with weight I/O
from ip_adapter.utils import DiskFullError, atomic_path, current_umask, is_disk_full

__all__ = [
    "atomic_path",
    "write_text_atomic",
    "write_json_atomic",
    "first_value",
    "resolve_path",
    "DiskFullError",
    "is_disk_full",
    "current_umask",
    "removed_on_disk_full",
    "apply_umask",
]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def apply_umask(path: str | os.PathLike) -> None:
    """Give the private (0600) files of ``path`` (a file, or every file under a folder) the mode a plain ``open``
    gives: 0o666 less the umask. For writers that create 0600 files whatever the umask: safetensors' ``save_file``,
    hence diffusers' and transformers' ``save_pretrained``. Other files (a user's, in the same folder) stay."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for p in path.rglob("*") if path.is_dir() else [path]:
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) == 0o600:
            os.chmod(p, mode)


@contextlib.contextmanager
def removed_on_disk_full(partial: str | os.PathLike, intact: str, resume: str):
    """Run a multi-file write into ``partial`` (a folder or file that only becomes real by a later rename); if it
    runs out of space, remove ``partial`` and raise :class:`DiskFullError` saying what is ``intact`` and how to
    ``resume``. Writers that do not go through :func:`atomic_path` (torch.save in accelerate's state) included."""
    partial = Path(partial)
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        raise DiskFullError(getattr(exc, "path", partial), exc, intact, resume) from exc


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
