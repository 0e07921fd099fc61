"""The real antelopev2 face-analysis pack from a Hugging Face mirror (insightface's own release link is dead).

``download_antelopev2(root)`` puts the five ``.onnx`` files into ``root/models/antelopev2`` — the layout
``FaceAnalysis(name="antelopev2", root=root)`` and :class:`faceid.face.analysis.FaceAnalyzer` read. Downloads go
through :mod:`faceid.hub.client` (partial downloads resume; ``HF_ENDPOINT`` or ``endpoint=`` selects a
mirror such as https://hf-mirror.com); files already in place are not fetched again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from faceid.hub import client

DEFAULT_REPO = "DIAMONIK7777/antelopev2"
ANTELOPE_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")
# Only these two are needed for InstantID (detection + recognition); pass files=REQUIRED_FILES to save ~150 MB.
REQUIRED_FILES = ("glintr100.onnx", "scrfd_10g_bnkps.onnx")


def download_antelopev2(
    root: str | os.PathLike = ".",
    repo_id: str = DEFAULT_REPO,
    endpoint: str | None = None,
    files=ANTELOPE_FILES,
    subfolder: str | None = None,
    revision: str | None = None,
    force: bool = False,
) -> Path:
    """Fetch the antelopev2 ``files`` from ``repo_id`` (optionally from its ``subfolder``) into
    ``root/models/antelopev2`` and return that folder."""
    model_dir = Path(root) / "models" / "antelopev2"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        target = model_dir / name
        if target.is_file() and target.stat().st_size > 0 and not force:
            print(f"{target} already present")
            continue
        print(f"{repo_id}/{subfolder + '/' if subfolder else ''}{name} -> {target}")
        got = client.download_file(
            repo_id, name, model_dir, endpoint=endpoint, subfolder=subfolder, revision=revision, force=force
        )
        got = Path(got)
        if got.resolve() != target.resolve():  # a subfolder in the repo: move the file up next to the others
            shutil.move(os.fspath(got), os.fspath(target))
        if not target.is_file() or target.stat().st_size == 0:
            raise RuntimeError(f"{repo_id}: download of {name} did not produce {target}")
    if subfolder:
        leftover = model_dir / subfolder
        if leftover.is_dir() and not any(p.is_file() for p in leftover.rglob("*")):
            shutil.rmtree(leftover)
    return model_dir
