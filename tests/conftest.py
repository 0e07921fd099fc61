"""Shared fixtures: the tiny offline checkpoints, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The repository (scripts and packages) and tests/ (the conftest_* helpers) for tests in any sub-folder.
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """``download.py --tiny`` layout: SDXL folder, IdentityNet, ip-adapter.bin, tiny antelopev2."""
    from faceid.tiny.models import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    build_tiny(root)
    return root


@pytest.fixture(scope="session")
def tiny_paths(tiny_dir):
    from faceid.tiny.models import tiny_paths as paths

    return paths(tiny_dir)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_paths):
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    return load_pipeline(
        tiny_paths["base_model"],
        tiny_paths["controlnet"],
        tiny_paths["face_adapter"],
        device="cpu",
        progress=False,
    )


class _RunsCode:
    """Unpickling this runs ``touch MARKER``: what a malicious face-info or checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_pickle(tmp_path):
    """``write(path, key, **other_entries)`` writes a pickled dict whose ``key`` runs code when unpickled;
    returns the marker path the code would create (it must never exist)."""
    import pickle

    marker = tmp_path / "code-ran"

    def write(path: Path, key: str, **others) -> Path:
        with open(path, "wb") as fh:
            pickle.dump({key: _RunsCode(marker), **others}, fh)
        return marker

    return write
