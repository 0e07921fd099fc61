"""The README's quickstart, run once as a user runs it (every real script in its own process, umask 022), and what
a user sees of it: a clear rise in same-person Face Sim, the picture, quiet output, readable files."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lines third-party libraries print that say nothing to our users (faceid/runtime.py silences them).
NOTICES = re.compile(
    r"Skipping publisher trust check|Failed to load CPU gemm_4bit_forward|kernels-community|"
    r"Saving current state|Optimizer state saved|Scheduler state saved|Sampler state for dataloader|"
    r"Random states saved|FutureWarning|UserWarning|DeprecationWarning"
)


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TQDM_DELAY", None)
    return env


def _run(argv, **kw) -> subprocess.CompletedProcess:
    # umask 022, as on a shared cluster: every output must come out -rw-r--r--
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=_env(),
        preexec_fn=lambda: os.umask(0o022), **kw,
    )  # fmt: skip


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """One quickstart run (the default steps), shared by the tests below."""
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    proc = _run(["quickstart.py", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quickstart_shows_identity_learned(quickstart):
    out, proc = quickstart
    sim = json.loads((out / "quickstart.json").read_text())["face_sim"]
    # the printed table and rise are the evaluation's figures
    for key in ("before_same", "after_same"):
        summary = json.loads((out / "eval" / key / "summary.json").read_text())
        assert summary["face_sim"]["mean"] == pytest.approx(sim[key])
    rise = sim["after_same"] - sim["before_same"]
    assert f"same-person Face Sim rose by {rise:+.3f}" in proc.stdout
    margin_before = sim["before_same"] - sim["before_other"]
    margin_after = sim["after_same"] - sim["after_other"]  # the person's own face, not any face
    assert rise >= 0.04 and margin_after >= 0.08 and margin_after - margin_before >= 0.08, sim


def test_quickstart_picture(quickstart):
    from PIL import Image

    import quickstart as qs

    out, proc = quickstart
    pic = Image.open(out / "quickstart.png")
    rows, cols = qs.PICTURE_PERSONS, 1 + 2 * len(qs.PROMPTS)
    assert pic.size == (cols * (128 + 6) + 6, 48 + rows * (128 + 6) + 6)
    assert str(out / "quickstart.png") in proc.stdout


def test_quickstart_output_is_quiet(quickstart):
    """No third-party notices; the checkpoint the training writes is one line."""
    _, proc = quickstart
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [ln for ln in lines if NOTICES.search(ln)] == []
    saved = [ln for ln in lines if re.search(r"checkpoint-\d+", ln)]
    assert len(saved) == len(list((quickstart[0] / "train").glob("checkpoint-*"))) >= 1, saved


def _modes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in folder.rglob("*")
        if p.is_file() and stat.S_IMODE(p.stat().st_mode) != 0o644
    }


def test_quickstart_outputs_follow_umask(quickstart):
    """Weights of download.py --tiny, preprocessing (index, embeddings), training (weights, checkpoint, trainer
    state), inference (images, kps.png, settings.json) and evaluation (summary.*, per_image.csv): -rw-r--r--."""
    out, _ = quickstart
    for part, must in (
        (
            "tiny",
            ["checkpoints/ip-adapter.bin", "checkpoints/ControlNetModel/diffusion_pytorch_model.safetensors"],
        ),
        ("index", ["index.jsonl"]),
        ("train", ["ip-adapter.bin", "ip-adapter.safetensors", "ControlNetModel/config.json"]),
        ("generations", ["generations/after/settings.json"]),
        ("eval", ["after_same/summary.json", "after_same/summary.md", "after_same/per_image.csv"]),
    ):
        for rel in must:
            assert (out / part / rel).is_file(), rel
        assert _modes(out / part) == {}, part
    ckpts = sorted((out / "train").glob("checkpoint-*/trainer_state.json"))
    assert ckpts, "the quickstart writes a checkpoint"
    assert list((out / "index").rglob("*.npy")) and list((out / "generations").rglob("*.png"))


def test_inference_run_quiet_and_readable(quickstart, tmp_path):
    """infer_from_pkl.py from the quickstart's trained weights: no third-party notices, outputs -rw-r--r--."""
    out, _ = quickstart
    tiny = out / "tiny"
    ref = sorted((out / "references").glob("*.png"))[0]
    gen = tmp_path / "infer"
    proc = _run([
        "infer_from_pkl.py", "--tiny", str(tiny), "--face_adapter", str(out / "train" / "ip-adapter.bin"),
        "--face_image", str(ref), "--face_info", "none", "--prompt", "a photo of a person, smiling",
        "--steps", "2", "--width", "64", "--height", "64", "--output_dir", str(gen),
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [ln for ln in (proc.stdout + proc.stderr).splitlines() if NOTICES.search(ln)]
    assert noisy == []
    assert {p.name for p in gen.iterdir()} >= {"kps.png", "settings.json"} and list(gen.glob("0*.png"))
    assert _modes(gen) == {}
