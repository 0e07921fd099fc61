"""The GPU check's reduced CPU version (tiny models, tiny sizes): every section runs and reports real figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _numel(state: dict) -> int:
    return sum(v.numel() for v in state.values())


def test_gpu_check_reduced(tiny_dir, tmp_path):
    import gpu_check

    from ip_adapter.weights import read_adapter

    out = tmp_path / "rows.json"
    rows = gpu_check.main(gpu_check.parse_args(["--reduced", "--tiny", str(tiny_dir), "--json", str(out)]))

    by = {(r.section, r.config): r for r in rows}
    train = [r for r in rows if r.section == "train"]
    infer = [r for r in rows if r.section == "infer"]
    face = [r for r in rows if r.section == "face"]
    speed = {r.config.split(", ")[-1]: r for r in rows if r.section == "speed"}
    assert len(train) == len(gpu_check.TRAIN_CONFIGS) + len(gpu_check.PRESET_24GB_CONFIGS) == 9
    assert train[-1].config == gpu_check.PRESET_24GB_NAME and train[-1].extra["optimizer"].endswith(
        "in_backward"
    )
    assert [r.config for r in infer] == list(gpu_check.PRESETS)
    assert len(face) == 1 and len(rows) == 14 + len(speed)
    # Speed options: measured on the CPU except compilation (minutes of inductor there), each with its optimizer.
    assert list(speed) == list(gpu_check.SPEED_CONFIGS)
    for label, r in speed.items():
        if r.extra["compile"]:
            assert r.status.startswith("skipped") and r.value is None, r
        else:
            assert r.status == "ok" and r.value > 0 and r.peak_gb > 0.1, r
            assert r.extra["optimizer"] == ("fused" if "fused" in label else "for-loop")
    assert speed["plain"].extra["first_step_s"] > 0 and speed["fused AdamW"].extra["x_plain"] > 0

    # Trained parameter counts match the checkpoints on disk (an independent count).
    image_proj, ip = read_adapter(tiny_dir / "checkpoints" / "ip-adapter.bin")
    adapter = _numel(image_proj) + _numel(ip)
    from safetensors.torch import load_file

    cn = _numel(load_file(str(next((tiny_dir / "checkpoints" / "ControlNetModel").glob("*.safetensors")))))
    for r in train:
        assert r.status == "ok", r
        assert r.unit == "s/step" and r.value > 0 and math.isfinite(r.value)
        assert r.peak_gb > 0.1  # the process's peak RSS (CPU): at least torch and the models
        expected = adapter + (cn if r.extra["train"] == "everything" else 0)
        assert r.extra["trained_params"] == expected, r

    for r in infer:
        if r.config == "sequential_cpu_offload":
            assert r.status.startswith("skipped") and r.value is None  # accelerate needs an accelerator
        else:
            assert r.status == "ok" and r.value > 0 and r.peak_gb > 0.1, r
            assert r.extra == {"steps": 2, "resolution": 64}

    (f,) = face
    assert f.unit == "images/s" and f.value > 0
    assert f.extra["images"] == 4 and f.extra["faces_found"] == 4
    assert f.extra["providers"][0] == "CPUExecutionProvider"

    # The JSON has the same rows and the header describes the run.
    data = json.loads(out.read_text())
    assert [(r["section"], r["config"]) for r in data["rows"]] == list(by)
    assert data["header"]["models"] == "tiny (reduced)" and data["header"]["device"] == "cpu"


def test_table_format():
    import gpu_check

    rows = [
        gpu_check.Row("train", "adapter only, ckpt off, AdamW", 1.25, "s/step", 20.5),
        gpu_check.Row("infer", "sequential_cpu_offload", None, "s/image", None, "OOM"),
    ]
    text = gpu_check.format_table(rows, {"device": "cuda:0 (X)"})
    lines = text.splitlines()
    assert lines[0] == "GPU check: device cuda:0 (X)"
    assert lines[1].split() == ["section", "configuration", "value", "unit", "peak", "GB", "status"]
    assert lines[2].split()[-4:] == ["1.250", "s/step", "20.50", "ok"]
    assert lines[3].split()[-4:] == ["-", "s/image", "-", "OOM"]


def test_shell_entry_point_passes_arguments():
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--help"],
        env={**os.environ, "PYTHON": sys.executable},  # the interpreter running the tests (CI's venv)
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "--reduced" in res.stdout and "GPU check" in res.stdout


def test_real_size_configs_match_sdxl():
    """The JSON facts give SDXL's sizes: UNet 2.567 B, IdentityNet 1.251 B, Resampler 0.082 B, and 70 IP layers
    (10 of width 640, 60 of 1280) of two [width, 2048] projections = 0.341 B (meta device: no memory)."""
    import sdxl_random as sr

    unet = sr.build_unet("meta")
    assert sr.n_params(unet) == 2_567_463_684  # SDXL base 1.0's UNet
    widths = sr.ip_layer_widths(unet)
    assert len(widths) == 70 and widths.count(640) == 10 and widths.count(1280) == 60
    with torch.device("meta"):
        layers = sr.install_ip_layers(unet)
    assert sr.n_params(layers) == sum(2 * w * 2048 for w in widths) == 340_787_200
    assert round(sr.n_params(sr.build_identitynet(unet, "meta")) / 1e9, 3) == 1.251
    assert round(sr.n_params(sr.build_resampler("meta")) / 1e9, 3) == 0.082
