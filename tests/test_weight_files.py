"""Truncated or wrong-kind weight files get a message naming the file and what was expected (faceid/weight_files.py),
through the loaders and through the scripts' CLI error path (exit 2, no traceback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from faceid import weight_files as wf
from faceid.train.errors import run_cli


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def lora_file(path: Path) -> Path:
    save_file(
        {"unet.down.lora_A.weight": torch.zeros(4, 8), "unet.down.lora_B.weight": torch.zeros(8, 4)}, path
    )
    return path


# kind -> (make a broken copy under tmp: returns (path to pass, file that is broken), check function, expected)
def _adapter_bin(t, tiny):
    p = truncate(copy(tiny / "checkpoints" / "ip-adapter.bin", t / "ip-adapter.bin"))
    return p, p


def _adapter_st(t, tiny):
    from ip_adapter.weights import read_adapter, write_adapter

    p = truncate(
        write_adapter(t / "ip-adapter.safetensors", *read_adapter(tiny / "checkpoints" / "ip-adapter.bin"))
    )
    return p, p


def _identitynet(t, tiny):
    d = copy(tiny / "checkpoints" / "ControlNetModel", t / "ControlNetModel")
    return d, truncate(d / "diffusion_pytorch_model.safetensors")


def _sdxl(t, tiny):
    d = copy(tiny / "stable-diffusion-xl-base-1.0", t / "sdxl")
    return d, truncate(d / "unet" / "diffusion_pytorch_model.safetensors")


def _vae(t, tiny):
    d = copy(tiny / "stable-diffusion-xl-base-1.0" / "vae", t / "vae")
    return d, truncate(d / "diffusion_pytorch_model.safetensors", 0.9)


def _lora(t, tiny):
    p = truncate(lora_file(t / "lora.safetensors"), 0.95)
    return p, p


def _antelope(t, tiny):
    d = copy(tiny / "models" / "antelopev2", t / "antelopev2")
    return d, truncate(d / "glintr100.onnx")


def _cache(t, tiny):
    p = t / "parts" / "w001-r00000-000000.safetensors"
    p.parent.mkdir()
    save_file({"lat/abc": torch.zeros(4, 8, 8)}, p)
    return [truncate(p)], p


KINDS = {
    "adapter .bin": (_adapter_bin, wf.check_adapter, "IP-Adapter"),
    "adapter .safetensors": (_adapter_st, wf.check_adapter, "IP-Adapter"),
    "IdentityNet": (_identitynet, wf.check_identitynet, "IdentityNet"),
    "SDXL folder": (_sdxl, wf.check_sdxl, "SDXL"),
    "VAE": (_vae, wf.check_vae, "VAE"),
    "LoRA": (_lora, wf.check_lora, "LoRA"),
    "antelopev2": (_antelope, wf.check_onnx_folder, "face-analysis pack"),
    "disk cache": (_cache, lambda files: wf.check_cache_parts(files, "cache/"), "precomputed cache"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_truncated_file_named_with_what_was_expected(kind, tmp_path, tiny_dir):
    make, check, expected = KINDS[kind]
    passed, broken = make(tmp_path, Path(tiny_dir))
    with pytest.raises(wf.WeightFileError) as err:
        check(passed)
    msg = str(err.value)
    assert str(broken) in msg and expected in msg and ("truncated" in msg or "only" in msg), msg


def test_whole_files_pass(tiny_dir):
    tiny = Path(tiny_dir)
    wf.check_pipeline_inputs(
        tiny / "stable-diffusion-xl-base-1.0",
        [tiny / "checkpoints" / "ControlNetModel"],
        tiny / "checkpoints" / "ip-adapter.bin",
        tiny / "stable-diffusion-xl-base-1.0" / "vae",
    )
    wf.check_onnx_folder(tiny / "models" / "antelopev2")
    wf.check_pipeline_inputs(
        "stabilityai/stable-diffusion-xl-base-1.0", ["InstantX/InstantID"]
    )  # hub ids: skipped


def test_wrong_kind(tmp_path, tiny_dir):
    tiny = Path(tiny_dir)
    unet_st = tiny / "stable-diffusion-xl-base-1.0" / "unet" / "diffusion_pytorch_model.safetensors"
    cases = [
        (wf.check_adapter, copy(unet_st, tmp_path / "ip-adapter.safetensors"), "another model"),
        (wf.check_identitynet, tiny / "stable-diffusion-xl-base-1.0" / "vae", "a AutoencoderKL folder"),
        (wf.check_sdxl, tiny / "checkpoints" / "ControlNetModel", "no model_index.json"),
        (wf.check_lora, unet_st, "no LoRA weights"),
    ]
    png = tmp_path / "ip-adapter.bin"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    cases.append((wf.check_adapter, png, "an image"))
    for check, path, problem in cases:
        with pytest.raises(wf.WeightFileError, match="expected") as err:
            check(path)
        assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


def test_truncated_identitynet_through_inference_cli(tmp_path, tiny_dir, capsys):
    """The issue's case: a truncated IdentityNet passed to infer_from_pkl.py ended in diffusers' OSError traceback."""
    import infer_from_pkl

    tiny = Path(tiny_dir)
    cn, broken = _identitynet(tmp_path, tiny)
    argv = ["--tiny", str(tiny), "--controlnet", str(cn), "--face_info", "none", "--prompt", "a person",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert run_cli(infer_from_pkl.main, infer_from_pkl.parse_args, argv) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "expected an IdentityNet" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("kind", ["adapter .safetensors", "SDXL folder", "IdentityNet"])
def test_truncated_weights_through_training_cli(kind, tmp_path, tiny_dir, capsys):
    """The trainer (and precompute_cache.py, which loads the same encoders) names the broken file, exit 2."""
    from conftest_train import make_index_dataset, tiny_args

    import train_instantId_sdxl as t

    make, _, expected = KINDS[kind]
    passed, broken = make(tmp_path, Path(tiny_dir))
    flag = {
        "adapter .safetensors": "--pretrained_ip_adapter_path",
        "SDXL folder": "--pretrained_model_name_or_path",
        "IdentityNet": "--controlnet_model_name_or_path",
    }[kind]
    index = make_index_dataset(tmp_path / "data")
    argv = tiny_args(tiny_dir, tmp_path / "run", "--data_json_file", str(index), "--max_train_steps", "1",
                     flag, str(passed))  # fmt: skip
    assert run_cli(t.main, t.parse_args, argv) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and expected in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "ip-adapter.bin").exists()


def test_truncated_antelopev2_through_face_info_cli(tmp_path, tiny_dir, capsys):
    from PIL import Image

    import get_face_info

    root = tmp_path / "root"
    _, broken = _antelope(root / "models", Path(tiny_dir))
    img = tmp_path / "me.png"
    Image.new("RGB", (64, 64)).save(img)
    argv = ["--face_image", str(img), "--output", str(tmp_path / "me.pkl"), "--root", str(root)]
    assert run_cli(get_face_info.main, get_face_info.parse_args, argv) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "expected a face-analysis pack" in err and "Traceback" not in err
