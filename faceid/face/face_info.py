"""Face-info files: what ``get_face_info.py`` writes and ``infer_from_pkl.py`` reads.

Two formats:

* ``.pkl`` — MFaceTech-compatible pickle of a dict with ``embedding`` and ``kps`` numpy arrays (plus optional
  ``bbox``, ``det_score``, ``frame``). It is read with :class:`RestrictedUnpickler`, which builds only numpy arrays,
  numpy scalars/dtypes and plain containers; any other global (``os.system``, ``builtins.eval``, a class) is refused
  before anything runs.
* ``.npz`` — our safe format, read with ``allow_pickle=False``.

``frame`` is the ``(width, height)`` of the image the keypoints refer to, so a reader can rescale them.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from faceid.files import atomic_path
from faceid.schema import EMBEDDING_DIM


class FaceInfoError(ValueError):
    """A face-info file is missing, unsafe or malformed; the message names the file."""


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "frozenset"),
    ("builtins", "set"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/scalar reconstruction and plain containers."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in ("numpy", "numpy.dtypes") and name.endswith("DType"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global '{module}.{name}' (only numpy arrays allowed)")


def safe_pickle_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _validate(info: dict, path: str) -> dict:
    if not isinstance(info, dict):
        raise FaceInfoError(f"{path}: expected a dict with 'embedding' and 'kps', got {type(info).__name__}")
    missing = [k for k in ("embedding", "kps") if k not in info]
    if missing:
        raise FaceInfoError(f"{path}: missing key(s) {missing}; found {sorted(map(str, info))}")
    emb = np.asarray(info["embedding"], dtype=np.float32).reshape(-1)
    if emb.size != EMBEDDING_DIM:
        raise FaceInfoError(f"{path}: embedding has {emb.size} values, expected {EMBEDDING_DIM}")
    if not np.all(np.isfinite(emb)):
        raise FaceInfoError(f"{path}: embedding contains NaN or inf")
    kps = np.asarray(info["kps"], dtype=np.float32)
    if kps.size != 10:
        raise FaceInfoError(f"{path}: kps has shape {kps.shape}, expected 5 points (5, 2)")
    out = {"embedding": emb, "kps": kps.reshape(5, 2)}
    for key in ("bbox", "det_score", "frame"):
        if key in info and info[key] is not None:
            out[key] = np.asarray(info[key], dtype=np.float32)
    if "frame" in out:
        out["frame"] = tuple(int(v) for v in out["frame"].reshape(-1)[:2])
    return out


def load_face_info(path: str | os.PathLike) -> dict:
    """Read a ``.pkl`` (restricted) or ``.npz`` face-info file → ``{"embedding": [512] f32, "kps": [5,2] f32, ...}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FaceInfoError(f"{path}: face-info file not found")
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                info = {k: z[k] for k in z.files}
        else:
            with open(path, "rb") as fh:
                info = safe_pickle_loads(fh.read())
    except pickle.UnpicklingError as exc:
        raise FaceInfoError(f"{path}: unsafe or invalid pickle: {exc}") from exc
    except (EOFError, OSError, ValueError) as exc:
        raise FaceInfoError(f"{path}: cannot read face info ({exc})") from exc
    return _validate(info, path)


def save_face_info(path: str | os.PathLike, info: dict) -> None:
    """Write atomically; ``.npz`` → safe format, anything else → MFaceTech-style pickle of numpy arrays."""
    path = Path(path)
    payload = {
        k: np.asarray(v) for k, v in info.items() if k in ("embedding", "kps", "bbox", "det_score", "frame")
    }
    _validate(payload, str(path))
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, **payload)
        else:
            with open(tmp, "wb") as fh:
                pickle.dump(payload, fh, protocol=4)
