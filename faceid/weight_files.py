"""Checks of the weight files a user passes, before a library reads them: a truncated file or a file of the wrong
kind gets a :class:`WeightFileError` naming the file and what was expected (the scripts print it without a
traceback, faceid/cli.py), instead of a parser's traceback from deep inside diffusers, torch or onnxruntime.

The checks read headers and sizes only (a safetensors header and its data extent, a zip's central directory, a
.npy header), so they cost milliseconds even on SDXL-sized files; ONNX models are parsed whole (about a second per
100 MB, once per load). One call per loader:

    check_adapter(path)            ip-adapter.bin / .safetensors
    check_identitynet(path)        IdentityNet (ControlNetModel folder, or a single .safetensors)
    check_sdxl(path)               SDXL diffusers folder (model_index.json and every component's weights)
    check_vae(path)                VAE folder or single file
    check_lora(path)               LoRA file or folder
    check_onnx_folder(path)        antelopev2 pack (every *.onnx)
    check_weight_file(path, what)  any single weight file, by suffix (.safetensors, .bin/.pt/.pth, .onnx, .npy)

A path that does not exist locally (a Hub id) is left to the loader.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".npy")
# diffusers component folders of an SDXL pipeline and the class each config names
SDXL_COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
}


class WeightFileError(ValueError):
    """A weight file is truncated, unreadable or not what the flag expects; the message names it and says what."""


def _fail(path, what: str, problem: str) -> None:
    raise WeightFileError(
        f"{path}: {problem}; expected {what}. Download or copy it again (python download.py for the official "
        f"weights), or pass the right file"
    )


def _local(path) -> Path | None:
    if path is None:
        return None
    p = Path(os.path.expanduser(os.fspath(path)))
    return p if p.exists() else None


# ---------------------------------------------------------------------------------------------------------------
# Single files


def check_safetensors(path, what: str = "a safetensors weight file") -> dict:
    """The header parses and the file holds every byte its tensors need; returns the header."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, what, f"only {size} bytes, not a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            _fail(
                path, what, f"not a safetensors file (header length {n} for a {size}-byte file; truncated?)"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            _fail(path, what, "not a safetensors file (unreadable header)")
    if not isinstance(header, dict):
        _fail(path, what, "not a safetensors file (header is not a table)")
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
        default=0,
    )
    if 8 + n + end > size:
        _fail(path, what, f"truncated: {size} bytes, its tensors need {8 + n + end}")
    return header


def check_torch_file(path, what: str = "a torch checkpoint") -> None:
    """A torch.save file (zip format since torch 1.6) with its central directory and every member's data; legacy
    pickle files are left to ``torch.load(weights_only=True)``."""
    path = Path(path)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            _fail(path, what, f"truncated or damaged ({exc})")
        size = path.stat().st_size
        if not any(i.filename.endswith("data.pkl") for i in infos):
            _fail(path, what, "a zip archive, not a torch checkpoint (no data.pkl)")
        end = max((i.header_offset + i.compress_size for i in infos), default=0)
        if end > size:
            _fail(path, what, f"truncated: {size} bytes, its data needs {end}")
        return
    if magic[:1] != b"\x80":  # a pickle starts with its protocol opcode
        kind = _sniff(path)
        _fail(path, what, f"not a torch checkpoint ({kind})" if kind else "not a torch checkpoint")


def check_onnx(path, what: str = "an ONNX model") -> tuple[list, int]:
    """The protobuf parses to the end of the file (a truncated model ends mid-field). Returns what the parse
    shows of the graph's interface: ``(shapes of its inputs (initializers excluded), number of outputs)``, a dim
    being an int, a name, or ``None``."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: a message naming the file is the point here
        _fail(path, what, f"truncated or not an ONNX model ({type(exc).__name__})")
    g = model.graph
    weights = {t.name for t in g.initializer}
    shapes = [
        [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in i.type.tensor_type.shape.dim
        ]
        for i in g.input
        if i.name not in weights
    ]
    return shapes, len(g.output)


def check_weight_file(path, what: str = "a weight file"):
    """Any single weight file by its suffix; a file with no known suffix is sniffed. Returns what an ONNX check
    returns (:func:`check_onnx`), else ``None``."""
    path = Path(path)
    if path.is_dir():
        _fail(path, what, "a folder, not a file")
    if path.stat().st_size == 0:
        _fail(path, what, "empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        check_safetensors(path, what)
    elif suffix in (".bin", ".pt", ".pth", ".ckpt"):
        check_torch_file(path, what)
    elif suffix == ".onnx":
        return check_onnx(path, what)
    elif suffix == ".npy":
        _check_npy(path, what)
    else:
        kind = _sniff(path)
        if kind == "safetensors":
            check_safetensors(path, what)
        elif kind in ("torch zip", "pickle"):
            check_torch_file(path, what)


def _check_npy(path: Path, what: str) -> None:
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # ValueError for short files, UnpicklingError for object arrays
        _fail(path, what, f"truncated or not a .npy array ({exc})")
    need = arr.offset + arr.nbytes if hasattr(arr, "offset") else 0
    if need > path.stat().st_size:
        _fail(path, what, f"truncated: {path.stat().st_size} bytes, the array needs {need}")


def _sniff(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return "torch zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] in (b"{", b"["):
        return "JSON text"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff":
        return "an image"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Folders


def _config_class(folder: Path, what: str, config: str = "config.json") -> str | None:
    cfg = folder / config
    if not cfg.is_file():
        _fail(folder, what, f"no {config} in the folder")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        _fail(cfg, what, f"{config} is not valid JSON (truncated?)")
    return data.get("_class_name") if isinstance(data, dict) else None


def check_diffusers_folder(path, expected_class: str | tuple[str, ...], what: str) -> None:
    """A diffusers/transformers model folder: ``config.json`` names ``expected_class`` (when it names a class)
    and every weight file in it is whole."""
    folder = Path(path)
    cls = _config_class(folder, what)
    expected = (expected_class,) if isinstance(expected_class, str) else expected_class
    if cls and cls not in expected:
        _fail(folder, what, f"a {cls} folder")
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not weights:
        _fail(folder, what, "no weight file (*.safetensors / *.bin) in the folder")
    for w in weights:
        check_weight_file(w, f"{what} weights")


def check_adapter(path) -> None:
    """ip-adapter.bin / .safetensors (official layout: image_proj + ip_adapter)."""
    p = _local(path)
    if p is None:
        return
    what = "an IP-Adapter checkpoint (ip-adapter.bin / .safetensors with image_proj and ip_adapter)"
    check_weight_file(p, what)
    if p.suffix == ".safetensors":
        keys = [k for k in check_safetensors(p, what) if k != "__metadata__"]
        if keys and not any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
            _fail(p, what, f"a safetensors file of another model (keys like {keys[0]!r})")


def check_identitynet(path) -> None:
    """IdentityNet: a ControlNetModel folder, or one .safetensors file."""
    p = _local(path)
    if p is None:
        return
    what = "an IdentityNet (ControlNetModel folder with config.json and diffusion_pytorch_model.safetensors)"
    if p.is_dir():
        check_diffusers_folder(p, ("ControlNetModel", "ControlNetXSAdapter"), what)
    else:
        check_weight_file(p, what)


def check_vae(path) -> None:
    p = _local(path)
    if p is None:
        return
    what = "a VAE (AutoencoderKL folder or single .safetensors)"
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() else p
        check_diffusers_folder(sub, ("AutoencoderKL", "AutoencoderTiny", "ConsistencyDecoderVAE"), what)
    else:
        check_weight_file(p, what)


def check_sdxl(path) -> None:
    """An SDXL diffusers folder: model_index.json, and each component's config and whole weights."""
    p = _local(path)
    if p is None:
        return
    what = "an SDXL diffusers folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/)"
    if p.is_file():
        check_weight_file(p, "an SDXL single-file checkpoint")
        return
    cls = _config_class(p, what, "model_index.json")
    if cls and "XL" not in cls:
        _fail(p, what, f"a {cls} folder, not SDXL")
    for sub, expected in SDXL_COMPONENTS.items():
        if not (p / sub).is_dir():
            _fail(p, what, f"no {sub}/ folder")
        check_diffusers_folder(p / sub, expected, f"{what}: {sub}/")


def check_lora(path) -> None:
    p = _local(path)
    if p is None:
        return
    what = "a LoRA (.safetensors with lora_* keys, or a folder holding one)"
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if not files:
            _fail(p, what, "no .safetensors / .bin file in the folder")
        p = files[0]
    check_weight_file(p, what)
    if p.suffix == ".safetensors":
        keys = [k for k in check_safetensors(p, what) if k != "__metadata__"]
        if keys and not any("lora" in k.lower() for k in keys):
            _fail(p, what, f"no LoRA weights in it (keys like {keys[0]!r})")


def check_onnx_folder(
    path, what: str = "a face-analysis pack (antelopev2: detection and recognition .onnx)"
) -> dict:
    """Every ``.onnx`` of a folder (or one file); returns ``{file: check_onnx's interface}``."""
    p = _local(path)
    if p is None:
        return {}
    files = sorted(p.glob("*.onnx")) if p.is_dir() else [p]
    if not files:
        _fail(p, what, "no .onnx file in it")
    return {f: check_weight_file(f, what) for f in files}


def check_pipeline_inputs(base_model=None, controlnets=(), face_adapter=None, vae=None) -> None:
    """Everything a pipeline or a training run loads, in one call (``None`` and Hub ids are skipped)."""
    check_sdxl(base_model)
    for cn in controlnets or ():
        check_identitynet(cn)
    check_adapter(face_adapter)
    check_vae(vae)


def check_cache_parts(files, cache_dir) -> None:
    """The part files of a precompute_cache.py cache."""
    for f in files:
        check_weight_file(
            f, f"a part of the precomputed cache {cache_dir} (rebuild it with precompute_cache.py)"
        )
