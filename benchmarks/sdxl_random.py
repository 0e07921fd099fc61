"""Real-size SDXL + IdentityNet + face adapter with random weights, built from the JSON facts in configs/sdxl/.

Nothing is downloaded: the configurations are the public ``config.json`` values of SDXL base 1.0 (UNet, VAE, both
CLIP text towers, scheduler), IdentityNet is ``ControlNetModel.from_unet`` of that UNet (InstantID's sizes) and the
Resampler is the official InstantID one. The tokenizers are the project's byte-level CLIP tokenizer (real text
towers, tiny vocabulary file; the embedding tables keep the real 49408 rows).

Used by ``bench_memory.py`` and ``gpu_check.py``; ``python benchmarks/sdxl_random.py`` prints the parameter counts.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG_DIR = ROOT / "configs" / "sdxl"


def load_config(name: str) -> dict:
    """``configs/sdxl/<name>.json`` without its ``_``-prefixed notes."""
    cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@contextlib.contextmanager
def building(device="cpu", dtype=torch.float32):
    """Parameters are created directly on ``device`` in ``dtype`` (no fp32 copy of a 2.6 B model on the way)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def fast_random(make, device="cpu", dtype=torch.float32, seed: int = 0):
    """``make()`` built on the meta device, then materialised with cheap random values: normal with std
    ``fan_in ** -0.5`` for matrices and kernels (activations stay O(1) like the default init), 1 for 1-d weights
    (norm scales), 0 for biases. Seconds instead of minutes for the 2.6 B UNet on a busy CPU. Modules with
    buffers are refused (``to_empty`` would leave them uninitialised)."""
    with building("meta", dtype):
        module = make()
    if device == "meta":
        return module
    if any(True for _ in module.buffers()):
        raise ValueError(f"{type(module).__name__} has buffers; build it with its own initialisation")
    module.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, (p.numel() / p.shape[0]) ** -0.5, generator=g)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def build_unet(device="cpu", dtype=torch.float32, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return fast_random(lambda: UNet2DConditionModel.from_config(load_config("unet")), device, dtype, seed)


def build_identitynet(unet, device="cpu", dtype=torch.float32, seed: int = 1):
    """``ControlNetModel.from_unet`` sizes, random weights (not copied: a copy would double the peak)."""
    from diffusers import ControlNetModel

    cfg = load_config("identitynet")
    return fast_random(
        lambda: ControlNetModel.from_unet(unet, load_weights_from_unet=False, **cfg), device, dtype, seed
    )


def build_resampler(device="cpu", dtype=torch.float32, seed: int = 2):
    from ip_adapter.resampler import Resampler

    return fast_random(lambda: Resampler(**load_config("resampler")), device, dtype, seed)


def install_ip_layers(unet, num_tokens: int = 16, seed: int = 3):
    """InstantID processors on every attention layer; returns the IP layers (``to_k_ip``/``to_v_ip``)."""
    from ip_adapter.weights import install_ip_processors

    torch.manual_seed(seed)
    return install_ip_processors(unet, num_tokens=num_tokens, scale=1.0, init_from_unet=False)


def build_vae(device="cpu", dtype=torch.float32, seed: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with building(device, dtype):
        return AutoencoderKL.from_config(load_config("vae"))


def write_tokenizers(out_dir) -> tuple[Path, Path]:
    """Two byte-level CLIP tokenizers (SDXL's second one pads with ``!``)."""
    from faceid.tiny.models import write_tiny_clip_tokenizer

    out_dir = Path(out_dir)
    return (
        write_tiny_clip_tokenizer(out_dir / "tokenizer"),
        write_tiny_clip_tokenizer(out_dir / "tokenizer_2", pad_token="!"),
    )


def build_text_encoders(tokenizer, device="cpu", dtype=torch.float32, seed: int = 5):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = []
    for i, (name, cls) in enumerate(
        (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
    ):
        torch.manual_seed(seed + i)
        with building(device, dtype):
            out.append(cls(CLIPTextConfig(**load_config(name), **special)).eval())
    return tuple(out)


def build_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(load_config("scheduler"))


def ip_layer_widths(unet) -> list[int]:
    """Hidden width of every cross-attention layer that gets face projections."""
    return [
        unet.get_submodule(name[: -len(".processor")]).to_k.out_features
        for name in unet.attn_processors
        if name.endswith("attn2.processor")
    ]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    """Parameter counts of the real-size parts, built on the meta device (no memory)."""
    unet = build_unet("meta")
    counts = {"unet": n_params(unet)}
    counts["identitynet"] = n_params(build_identitynet(unet, "meta"))
    counts["resampler"] = n_params(build_resampler("meta"))
    widths = ip_layer_widths(unet)
    with torch.device("meta"):
        layers = install_ip_layers(unet)
    counts["ip_layers"] = n_params(layers)
    counts["vae"] = n_params(build_vae("meta"))
    cross = unet.config.cross_attention_dim
    print(
        f"cross-attention layers: {len(widths)} ({widths.count(640)} of width 640, {widths.count(1280)} of 1280); "
        f"2 x [width, {cross}] each = {sum(2 * w * cross for w in widths) / 1e9:.3f} B"
    )
    for k, v in counts.items():
        print(f"{k:12s} {v / 1e9:7.3f} B params")


if __name__ == "__main__":
    main()
