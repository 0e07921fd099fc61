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


# Loggers of libraries whose INFO/WARNING lines say nothing to our users (accelerate: four lines per checkpoint;
# kernels/bitsandbytes: "Skipping publisher trust check", "Failed to load CPU gemm_4bit_forward"; the others:
# weight-loading notices). Errors still show.
QUIET_LOGGERS = {
    "transformers": "ERROR",
    "diffusers": "ERROR",
    "bitsandbytes": "ERROR",
    "kernels": "ERROR",
    "huggingface_hub": "ERROR",
    "accelerate": "WARNING",
    "torch.distributed.elastic": "WARNING",
}
PROGRESS_DELAY_S = 5.0  # a progress bar appears only once its work has run this long


def quiet_third_party() -> None:
    """Silence what transformers, diffusers, accelerate, bitsandbytes/kernels and huggingface_hub print that says
    nothing to our users; errors still show. The scripts call this once at start-up (faceid/cli.py). Progress
    bars (ours and the libraries') appear only on long work: after :data:`PROGRESS_DELAY_S` seconds."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DELAY", str(PROGRESS_DELAY_S))  # read by tqdm at import (child processes too)
    _delay_progress_bars(float(os.environ["TQDM_DELAY"]))
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"(diffusers|transformers|huggingface_hub)"
    )
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
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


def _delay_progress_bars(seconds: float) -> None:
    """``delay=seconds`` as the default of every tqdm bar already importable (TQDM_DELAY covers later imports)."""
    try:
        import tqdm.std
    except ImportError:
        return
    init = tqdm.std.tqdm.__init__
    if getattr(init, "_faceid_delay", False):
        return

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("delay", seconds)
        init(self, *args, **kwargs)

    __init__._faceid_delay = True
    tqdm.std.tqdm.__init__ = __init__
