"""Weight I/O for the face adapter, in one place.

Official layout (``ip-adapter.bin``, loaded unchanged by the official pipeline and ComfyUI)::

    {"image_proj": <Resampler state>, "ip_adapter": {"1.to_k_ip.weight": ..., "1.to_v_ip.weight": ..., ...}}

where the number is the index of the processor in ``unet.attn_processors`` (odd = cross-attention; SDXL 1..139).
``.safetensors`` files hold the same tensors flat, as ``image_proj.<key>`` and ``ip_adapter.<key>`` (ComfyUI's form).
``.bin`` files are read with ``torch.load(weights_only=True)``: no code in a checkpoint can run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ip_adapter.attention_processor import AttnProcessor, IPAttnProcessor
from ip_adapter.resampler import Resampler, resampler_kwargs_from_state
from ip_adapter.utils import atomic_path


class AdapterWeightsError(ValueError):
    """A checkpoint does not fit the model; the message names the keys and shapes."""


def install_ip_processors(
    unet, num_tokens: int = 16, scale: float = 1.0, init_from_unet: bool = True
) -> nn.ModuleList:
    """Give every attention layer of ``unet`` an InstantID processor; return them as the official ``ModuleList``.

    Cross-attention layers get :class:`IPAttnProcessor` sized from the layer itself (its ``to_k`` output width
    and the UNet's cross-attention dim); with ``init_from_unet`` their face projections start as copies of the
    layer's ``to_k``/``to_v`` (what training from scratch wants).
    """
    procs = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name[: -len(".processor")])
        if name.endswith("attn1.processor") or not getattr(attn, "is_cross_attention", True):
            procs[name] = AttnProcessor()
            continue
        proc = IPAttnProcessor(
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features,
            scale=scale,
            num_tokens=num_tokens,
        )
        if init_from_unet and attn.to_k.weight.device.type != "meta":
            with torch.no_grad():
                proc.to_k_ip.weight.copy_(attn.to_k.weight)
                proc.to_v_ip.weight.copy_(attn.to_v.weight)
        procs[name] = proc.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
    unet.set_attn_processor(procs)
    return nn.ModuleList(unet.attn_processors.values())


def ip_modules(unet) -> nn.ModuleList:
    return nn.ModuleList(unet.attn_processors.values())


def ip_layers_state(unet) -> dict[str, torch.Tensor]:
    """The ``ip_adapter`` part of the official layout (only the ``to_k_ip``/``to_v_ip`` weights)."""
    state = ip_modules(unet).state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def check_state(module: nn.Module, state: dict, what: str) -> None:
    """Raise :class:`AdapterWeightsError` naming missing/unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
        raise AdapterWeightsError(f"{what} does not fit the model: " + "; ".join(parts))


def _short(items, n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def load_ip_layers(unet, ip_state: dict, what: str = "ip_adapter weights") -> None:
    layers = ip_modules(unet)
    check_state(layers, ip_state, what)
    layers.load_state_dict(ip_state, strict=True)


def split_flat(state: dict, path: str = "checkpoint") -> tuple[dict, dict]:
    """Nested ``{"image_proj", "ip_adapter"}`` or flat ``image_proj.*``/``ip_adapter.*`` → the two dicts."""
    if "image_proj" in state and "ip_adapter" in state and isinstance(state["image_proj"], dict):
        return dict(state["image_proj"]), dict(state["ip_adapter"])
    image_proj, ip = {}, {}
    for key, value in state.items():
        if key.startswith("image_proj."):
            image_proj[key[len("image_proj.") :]] = value
        elif key.startswith("ip_adapter."):
            ip[key[len("ip_adapter.") :]] = value
    if not image_proj or not ip:
        raise AdapterWeightsError(
            f"{path}: expected 'image_proj' and 'ip_adapter' entries (nested or 'image_proj.*'/'ip_adapter.*'); "
            f"found keys {_short(sorted(map(str, state)))}"
        )
    return image_proj, ip


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read an adapter checkpoint → ``(image_proj_state, ip_adapter_state)`` on CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: face adapter checkpoint not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except Exception as exc:  # truncated or not a safetensors file
            raise AdapterWeightsError(f"{path}: cannot read as a safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refusals and corrupt files alike
            raise AdapterWeightsError(
                f"{path}: cannot read as a weights-only torch checkpoint ({exc})"
            ) from exc
    if not isinstance(state, dict):
        raise AdapterWeightsError(f"{path}: expected a dict, got {type(state).__name__}")
    return split_flat(state, path)


def write_adapter(
    path: str | os.PathLike, image_proj: dict | nn.Module, ip_adapter: dict | nn.Module
) -> Path:
    """Write the official layout atomically: nested dict for ``.bin``, flat prefixed keys for ``.safetensors``."""
    if isinstance(image_proj, nn.Module):
        image_proj = image_proj.state_dict()
    if isinstance(ip_adapter, nn.Module):
        ip_adapter = ip_adapter.state_dict()
    image_proj = {k: v.detach().cpu().contiguous() for k, v in image_proj.items()}
    ip_adapter = {k: v.detach().cpu().contiguous() for k, v in ip_adapter.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
            flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
            save_file(flat, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, tmp)
    return path


def build_resampler(image_proj_state: dict, dtype=None, device=None) -> Resampler:
    """A Resampler sized from ``image_proj_state`` with the weights loaded strictly."""
    model = Resampler(**resampler_kwargs_from_state(image_proj_state))
    check_state(model, image_proj_state, "image_proj weights")
    model.load_state_dict(image_proj_state, strict=True)
    return model.to(device=device, dtype=dtype)
