"""LoRAs on a loaded pipeline: ``PATH[:SCALE]`` specs, loading several at once with their scales, unloading."""

from __future__ import annotations

from pathlib import Path

from faceid.weight_files import check_lora


class LoraError(ValueError):
    """A LoRA that cannot be loaded (missing file, peft missing, a LoRA for another model); names the spec."""


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"path/to/lora.safetensors:0.8"`` → ``(path, 0.8)``; without ``:SCALE`` the scale is 1.0."""
    path, sep, scale = str(spec).rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return str(spec), 1.0


def load_loras(pipe, specs) -> list[str]:
    """Load LoRAs (``"PATH[:SCALE]"`` strings or ``(path, scale)`` pairs; a file or a folder with
    ``pytorch_lora_weights.safetensors``) into the UNet/text encoders and activate them all with their scales.
    Needs ``peft``. Returns the adapter names (``lora0``, ``lora1``...)."""
    names, weights = [], []
    for i, spec in enumerate(specs):
        path, scale = parse_lora_spec(spec) if isinstance(spec, str) else (str(spec[0]), float(spec[1]))
        if not Path(path).exists():
            raise FileNotFoundError(f"LoRA not found: {path}")
        check_lora(path)
        name = f"lora{i}"
        p = Path(path)
        try:
            if p.is_file():
                pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=name)
            else:
                pipe.load_lora_weights(str(p), adapter_name=name)
        except (ValueError, OSError) as exc:
            raise LoraError(f"LoRA {path} not loaded ({type(exc).__name__}: {exc})") from exc
        names.append(name)
        weights.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def unload_loras(pipe) -> None:
    """Remove every LoRA: the weights are exactly those before :func:`load_loras`."""
    pipe.unload_lora_weights()
