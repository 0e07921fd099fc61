"""Weights each small-GPU preset keeps on the GPU, from the real SDXL / IdentityNet / CLIP configurations
(parameter counts on the meta device: exact, no download), and the measured effect of VAE slicing on the tiny
weights (peak RSS of a batched decode on the CPU, in a child process each).

    python benchmarks/bench_inference_memory.py

Activations are not measurable here (no GPU): the README adds an estimate and says so.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
)


def component_bytes(bytes_per_param: int = 2) -> dict[str, int]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from faceid.tiny.models import SDXL_UNET_CONFIG
    from ip_adapter.resampler import OFFICIAL_KWARGS, Resampler
    from ip_adapter.weights import install_ip_processors

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
        controlnet = ControlNetModel.from_unet(unet)
        install_ip_processors(unet, num_tokens=16)  # the face key/value projections live in the UNet
        parts = {
            "unet (with face layers)": count(unet),
            "identitynet": count(controlnet),
            "text_encoder (CLIP-L)": count(CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L))),
            "text_encoder_2 (bigG)": count(
                CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_BIGG))
            ),
            "vae": count(AutoencoderKL(**SDXL_VAE)),
            "resampler": count(Resampler(**OFFICIAL_KWARGS)),
        }
    return {k: v * bytes_per_param for k, v in parts.items()}


def decode_peak(slicing: bool) -> dict:
    """Child process: peak RSS of decoding a batch of 4 latents (256x256) with the tiny VAE."""
    code = f"""
import json, resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from faceid.tiny.models import build_tiny
from diffusers import AutoencoderKL
paths = build_tiny({str(ROOT / "tiny")!r}, faces=False)
vae = AutoencoderKL.from_pretrained(str(paths["base_model"] / "vae")).eval()
if {slicing}:
    vae.enable_slicing()
z = torch.randn(4, 4, 32, 32)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    vae.decode(z)
print(json.dumps({{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "added_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    gib = 1024**3
    parts = component_bytes()
    total = sum(parts.values())
    print("fp16 weights (exact, from the real configurations):")
    for name, b in parts.items():
        print(f"  {name:26s} {b / gib:6.2f} GiB")
    print(f"  {'total':26s} {total / gib:6.2f} GiB")
    denoise = parts["unet (with face layers)"] + parts["identitynet"] + parts["resampler"]
    print("weights resident on the GPU while denoising:")
    print(f"  none        {total / gib:6.2f} GiB (everything)")
    print(
        f"  model       {denoise / gib:6.2f} GiB (UNet + IdentityNet; text encoders and VAE wait on the CPU)"
    )
    print("  sequential  < 0.1 GiB (one layer at a time)")
    for slicing in (False, True):
        r = decode_peak(slicing)
        print(f"tiny VAE decode, batch 4, slicing={slicing}: +{r['added_mib']:.0f} MiB RSS")
    _ = resource


if __name__ == "__main__":
    main()
