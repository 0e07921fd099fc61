"""infer_from_pkl.py end to end on tiny weights, its error messages, and download.py with the hub replaced."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import download
import infer_from_pkl
from faceid.errors import InputError
from faceid.tiny.faces import synthetic_face_array

ROOT = Path(__file__).resolve().parents[2]


def infer_argv(tiny_paths, tmp_path, face_info, **extra):
    img, _ = synthetic_face_array((96, 128), seed=3)
    face = tmp_path / "face.png"
    Image.fromarray(img).save(face)
    argv = [
        "--base_model",
        str(tiny_paths["base_model"]),
        "--controlnet",
        str(tiny_paths["controlnet"]),
        "--face_adapter",
        str(tiny_paths["face_adapter"]),
        "--face_image",
        str(face),
        "--face_info",
        str(face_info),
        "--prompt",
        "a person in a garden",
        "--prompt",
        "a person on the moon",
        "--num_images",
        "2",
        "--steps",
        "2",
        "--min_side",
        "64",
        "--max_side",
        "64",
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return argv


def write_pkl(path, emb_size=512, frame=None):
    info = {
        "embedding": np.random.default_rng(0).standard_normal(emb_size).astype(np.float32),
        "kps": np.array([[30, 40], [60, 40], [45, 60], [33, 80], [57, 80]], np.float32),
    }
    if frame:
        info["frame"] = np.array(frame)
    with open(path, "wb") as fh:
        pickle.dump(info, fh)
    return path


def test_infer_end_to_end_writes_images_and_settings(tiny_paths, tmp_path):
    pkl = write_pkl(tmp_path / "face.pkl", frame=(96, 128))
    records = infer_from_pkl.main(infer_from_pkl.parse_args(infer_argv(tiny_paths, tmp_path, pkl)))
    out = tmp_path / "out"
    settings = json.loads((out / "settings.json").read_text())
    assert len(records) == 4 and len(settings["images"]) == 4
    assert {(r["prompt"], r["seed"]) for r in settings["images"]} == {
        (p, s) for p in ("a person in a garden", "a person on the moon") for s in (42, 43)
    }
    sizes = {Image.open(out / r["path"]).size for r in settings["images"]}
    assert sizes == {(64, 64)}
    assert settings["steps"] == 2 and settings["face_info"] == str(pkl)
    a = np.asarray(Image.open(out / "00_42.png"), dtype=np.int16)
    b = np.asarray(Image.open(out / "00_43.png"), dtype=np.int16)
    assert np.abs(a - b).max() > 0  # different seeds, different images
    # Keypoints were rescaled from the recorded 96x128 frame to 64x64.
    kps = np.asarray(Image.open(out / "kps.png"))
    assert kps[int(40 * 64 / 128), int(30 * 64 / 96)].any()


def test_infer_refuses_code_in_pickle(tiny_paths, tmp_path, evil_pickle):
    marker = evil_pickle(tmp_path / "evil.pkl", "embedding", kps=np.zeros((5, 2)))
    with pytest.raises(InputError, match="evil.pkl: unsafe or invalid pickle"):
        infer_from_pkl.main(
            infer_from_pkl.parse_args(infer_argv(tiny_paths, tmp_path, tmp_path / "evil.pkl"))
        )
    assert not marker.exists() and not (tmp_path / "out" / "settings.json").exists()


def test_infer_names_missing_files_and_bad_sizes(tiny_paths, tmp_path):
    with pytest.raises(InputError, match="nope.pkl: face-info file not found"):
        infer_from_pkl.main(
            infer_from_pkl.parse_args(infer_argv(tiny_paths, tmp_path, tmp_path / "nope.pkl"))
        )
    bad = write_pkl(tmp_path / "small.pkl", emb_size=256)
    with pytest.raises(InputError, match="small.pkl: embedding has 256 values, expected 512"):
        infer_from_pkl.main(infer_from_pkl.parse_args(infer_argv(tiny_paths, tmp_path, bad)))
    pkl = write_pkl(tmp_path / "ok.pkl")
    argv = infer_argv(tiny_paths, tmp_path, pkl, face_adapter=tmp_path / "missing.bin")
    with pytest.raises(InputError, match="face adapter not found: .*missing.bin"):
        infer_from_pkl.main(infer_from_pkl.parse_args(argv))
    argv = infer_argv(tiny_paths, tmp_path, pkl, face_image=tmp_path / "gone.jpg")
    with pytest.raises(InputError, match="gone.jpg: file not found"):
        infer_from_pkl.main(infer_from_pkl.parse_args(argv))


def test_infer_tiny_flag_runs_offline(tiny_dir, tmp_path):
    import shutil

    argv = ["--tiny", str(tiny_dir), "--output_dir", str(tmp_path / "t"), "--prompt", "a portrait"]
    records = infer_from_pkl.main(infer_from_pkl.parse_args(argv))
    assert len(records) == 1 and (tmp_path / "t" / records[0]["path"]).is_file()
    # An explicit (e.g. trained) adapter is kept; only the paths left at their defaults come from --tiny.
    trained = shutil.copy(tiny_dir / "checkpoints" / "ip-adapter.bin", tmp_path / "trained.bin")
    infer_from_pkl.main(infer_from_pkl.parse_args(argv + ["--face_adapter", str(trained)]))
    settings = json.loads((tmp_path / "t" / "settings.json").read_text())
    assert settings["face_adapter"] == str(trained)
    assert settings["controlnet"] == str(tiny_dir / "checkpoints" / "ControlNetModel")


def test_download_tiny(tmp_path, capsys):
    paths = download.main(download.parse_args(["--tiny", str(tmp_path / "t")]))
    assert (paths["base_model"] / "unet" / "config.json").is_file()
    assert (paths["controlnet"] / "config.json").is_file() and paths["face_adapter"].is_file()
    assert sorted(p.name for p in paths["antelopev2"].glob("*.onnx")) == [
        "glintr100.onnx",
        "scrfd_10g_bnkps.onnx",
    ]
    assert "infer_from_pkl.py --tiny" in capsys.readouterr().out


def test_download_models_with_hub_replaced(tmp_path, monkeypatch, capsys):
    import faceid.hub.models as hub
    from faceid.hub import client

    calls = []

    def fake_download(repo_id, filename, local_dir, endpoint=None, repo_type=None):
        calls.append((repo_id, filename, endpoint))
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "wb").close()
        return target

    snapshots = []
    monkeypatch.setattr(client, "download_file", fake_download)
    monkeypatch.setattr(client, "snapshot", lambda *a, **k: snapshots.append((a, k)))
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    argv = [
        "--checkpoints_dir",
        str(tmp_path / "ck"),
        "--no_faces",
        "--sdxl",
        "--sdxl_dir",
        str(tmp_path / "sdxl"),
    ]
    paths = download.main(download.parse_args(argv))
    assert [c[1] for c in calls] == list(hub.INSTANTID_FILES)
    assert all(c[0] == "InstantX/InstantID" for c in calls)
    assert client.endpoint_or_env(None) == "https://mirror.example"
    assert (tmp_path / "ck" / "ControlNetModel" / "config.json").is_file()
    assert paths["face_adapter"] == tmp_path / "ck" / "ip-adapter.bin"
    ((args, kwargs),) = snapshots
    assert (
        args[0] == hub.SDXL_REPO
        and "unet/diffusion_pytorch_model.fp16.safetensors" in kwargs["allow_patterns"]
    )
    out = capsys.readouterr().out
    assert "ip-adapter.bin ->" in out


def test_download_without_hub_says_what_to_do(tmp_path):
    """No network here and HF_HUB_OFFLINE=1: the real huggingface_hub call fails; the script prints the reason and
    the ways out (mirror, proxy, --tiny) and exits 2 without a traceback."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "download.py", "--checkpoints_dir", str(tmp_path / "ck"), "--no_faces"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "InstantX/InstantID/ControlNetModel/config.json" in proc.stderr
    assert "HF_ENDPOINT" in proc.stderr and "--tiny" in proc.stderr


def test_download_fails_fast_when_the_hub_host_does_not_resolve(tmp_path, monkeypatch):
    from faceid.hub import client

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(client.HubUnreachable, match="no-such-host.invalid.*HF_ENDPOINT.*--tiny"):
        client.download_file("InstantX/InstantID", "ip-adapter.bin", tmp_path)
    assert not any(tmp_path.iterdir())
