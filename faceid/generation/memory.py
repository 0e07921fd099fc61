"""Small-GPU presets applied to a loaded pipeline (:func:`apply_memory_options`)."""

from __future__ import annotations

OFFLOAD_CHOICES = ("none", "model", "sequential")


def apply_memory_options(
    pipe, offload: str = "none", vae_slicing: bool = False, vae_tiling: bool = False, device=None
):
    """Small-GPU presets. ``offload="model"``: each model moves to the GPU only while it runs (the UNet and
    IdentityNet together during denoising); ``"sequential"``: layer by layer (least memory, slowest).
    ``vae_slicing`` decodes a batch one image at a time; ``vae_tiling`` decodes large images in tiles.
    ``device`` is the accelerator (default: the one found; on a CPU-only machine pass "cpu" to test)."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    return pipe
