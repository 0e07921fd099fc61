"""Small helpers with no model code: the one atomic-write rule of the project, and the names the official
InstantID / IP-Adapter scripts import (``is_torch2_available``)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
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
    indexes, face-info files, reports) goes through this, so nothing already written is ever half-replaced. The
    file gets the mode a plain ``open`` would give (0o666 less the umask; mkstemp's 0600 would make every output
    private), and a write that runs out of space raises :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # a writer may have moved it already
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            tmp.unlink(missing_ok=True)
            raise DiskFullError(path, exc) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask without changing it (``/proc/self/status``); elsewhere set-and-restore under a lock
    (``os.umask`` has no read-only form, and the brief change would affect files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Disk full: one exception for every writer, with the file it was writing


_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# What torch's zip writer raises instead of OSError when a write comes up short (the disk filled up under it).
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def is_disk_full(exc: BaseException) -> bool:
    """True for an exception (or its cause chain) that means the device ran out of space or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            return True
        if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_SHORT_WRITE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class DiskFullError(OSError):
    """A write ran out of disk space; names the file, and says what is intact and what to do.

    ``path``: the file (or folder) being written; ``intact``/``resume``: sentences for the message (the caller
    knows what was committed before, e.g. the previous training checkpoint)."""

    def __init__(self, path, cause: BaseException | None = None, intact: str | None = None, resume=None):
        self.path = Path(path)
        self.intact = intact or f"{self.path} is unchanged (the partial write was removed)"
        self.resume = resume or "free some space (or write elsewhere) and run the same command again"
        free = _free_space(self.path)
        msg = f"no space left on the device while writing {self.path}{free}: {self.intact}; {self.resume}"
        super().__init__(errno.ENOSPC, msg)

    def __str__(self) -> str:
        return self.strerror


def _free_space(path: Path) -> str:
    import shutil

    for p in (path, *path.parents):
        if p.exists():
            try:
                return f" ({shutil.disk_usage(p).free / 2**20:.1f} MiB free on {p})"
            except OSError:
                return ""
    return ""
