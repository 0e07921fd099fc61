"""Model downloads from the Hugging Face Hub (InstantID weights, SDXL base), resumable, ``HF_ENDPOINT`` honoured.

Every network call goes through :mod:`faceid.hub.client`.
"""

from __future__ import annotations

from pathlib import Path

from faceid.hub import client

INSTANTID_REPO = "InstantX/InstantID"
INSTANTID_FILES = (
    "ControlNetModel/config.json",
    "ControlNetModel/diffusion_pytorch_model.safetensors",
    "ip-adapter.bin",
)
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
# The diffusers folder only (no single-file checkpoints, no ONNX/OpenVINO/Flax copies), fp16 weights.
SDXL_PATTERNS = (
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/model.fp16.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
)


def download_instantid(
    checkpoints_dir="checkpoints", repo_id: str = INSTANTID_REPO, endpoint=None
) -> dict[str, Path]:
    """IdentityNet and the face adapter → ``checkpoints_dir/ControlNetModel/``, ``checkpoints_dir/ip-adapter.bin``."""
    out = Path(checkpoints_dir)
    for filename in INSTANTID_FILES:
        target = out / filename
        print(f"{repo_id}/{filename} -> {target}")
        client.download_file(repo_id, filename, out, endpoint=endpoint)
    return {"controlnet": out / "ControlNetModel", "face_adapter": out / "ip-adapter.bin"}


def download_sdxl(local_dir, repo_id: str = SDXL_REPO, endpoint=None) -> Path:
    """The SDXL base diffusers folder (fp16 weights, ~7 GB) → ``local_dir``."""
    print(f"{repo_id} (diffusers folder, fp16 weights) -> {local_dir}")
    client.snapshot(repo_id, local_dir, allow_patterns=SDXL_PATTERNS, endpoint=endpoint)
    return Path(local_dir)
