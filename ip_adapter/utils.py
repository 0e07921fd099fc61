"""Small helpers with no model code: the one atomic-write rule of the project, and the names the official
InstantID / IP-Adapter scripts import (``is_torch2_available``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch.nn.functional as F


def is_torch2_available() -> bool:
    """True when PyTorch has ``scaled_dot_product_attention`` (the official scripts branch on this)."""
    return hasattr(F, "scaled_dot_product_attention")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on POSIX).

    On error the temporary file is removed and ``path`` is left as it was. Every writer in the project (weights,
    indexes, face-info files, reports) goes through this, so nothing already written is ever half-replaced.
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
