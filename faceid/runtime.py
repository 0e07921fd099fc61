"""Device and dtype selection shared by the scripts: CUDA fp16 when a GPU is present, CPU fp32 otherwise."""

from __future__ import annotations

import torch

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def pick_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """``device``/``dtype`` may be None/"auto" (chosen here), names ("cuda", "fp16") or torch objects."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype in (None, "auto"):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = DTYPES[dtype.lower()]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 convolutions are slow or missing on CPU
    return device, dtype


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` keyword for a dtype: ``dtype=`` on diffusers that has it, ``torch_dtype=`` before."""
    try:
        from diffusers.utils import deprecation_utils

        if hasattr(deprecation_utils, "_resolve_dtype"):
            return {"dtype": dtype}
    except ImportError:
        pass
    return {"torch_dtype": dtype}


def quiet_third_party() -> None:
    """Silence what transformers, diffusers and huggingface_hub print that says nothing to our users (weight
    loading/writing bars of small files, advisory notices); errors still show. The scripts call this once at
    start-up; long work (downloads, denoising, training) keeps its own progress bars."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"(diffusers|transformers|huggingface_hub)"
    )
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    for name in ("transformers", "diffusers", "bitsandbytes"):  # bitsandbytes: "kernels" notice on CPUs
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
