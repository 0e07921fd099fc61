"""Fixtures for the app tests: face photos the tiny detector finds, and a tiny training-run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from app_inputs import BACKGROUND, face_photo
from PIL import Image


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (and much faster than on two on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Good and bad uploads, made once."""
    d = tmp_path_factory.mktemp("uploads")
    out = {
        # Patterns the tiny detector sees as one face each (some textures split into several detections).
        "a": face_photo(d / "a.png", pattern=2),
        "b": face_photo(d / "b.png", size=(240, 240), box=(40, 60, 170, 190), pattern=4),
        "pose": face_photo(d / "pose.png", size=(320, 192), box=(180, 30, 300, 150), pattern=6),
        "two": face_photo(d / "two.png", size=(320, 200), faces=[(20, 40, 100, 120), (150, 30, 290, 170)]),
    }
    blank = Image.new("RGB", (200, 160), BACKGROUND)
    blank.save(d / "blank.png")
    out["no_face"] = d / "blank.png"
    (d / "notes.png").write_text("this is not an image\n")
    out["not_image"] = d / "notes.png"
    # 2600 x 1600 = 4.16 MP: over HUGE_LIMIT (the tests' --max_pixels; the app's default is 40 MP, the same code).
    Image.new("RGB", (2600, 1600), BACKGROUND).save(d / "huge.png")
    out["huge"] = d / "huge.png"
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_paths, tmp_path_factory) -> Path:
    """A training run's output folder: checkpoint-1, checkpoint-2 (complete), a partial checkpoint-3 and the
    final export, each with its own IdentityNet and adapter (tiny builders, other seeds)."""
    from diffusers import UNet2DConditionModel

    from faceid.tiny.models import build_tiny_adapter, build_tiny_identitynet

    run = tmp_path_factory.mktemp("run")
    unet = UNet2DConditionModel.from_pretrained(tiny_paths["base_model"] / "unet")
    for name, seed, complete in (
        ("checkpoint-1", 101, True),
        ("checkpoint-2", 202, True),
        (".checkpoint-3.partial", 303, False),
        ("", 404, False),
    ):
        folder = run / name if name else run
        build_tiny_identitynet(unet, folder / "ControlNetModel", seed=seed)
        build_tiny_adapter(unet, folder / "ip-adapter.bin", seed=seed + 1)
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(name.split("-")[1])}))
    # A checkpoint folder without its state file is being written: never offered.
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-9")
    (run / "checkpoint-9" / "trainer_state.json").unlink()
    return run
