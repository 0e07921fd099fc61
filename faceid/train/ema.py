"""Exponential moving average of the trained weights (``--use_ema``).

After every optimizer step, for every trained parameter θ (Resampler, IP layers, IdentityNet):
``ema ← decay · ema + (1 − decay) · θ``, starting from the weights training starts with. The shadow is fp32 on the
training device (as large as the trained weights: ~5 GB for a full IdentityNet). It is saved in every checkpoint as
``ema.safetensors`` (restored on resume, so an interrupted run continues the same average) and, when on, it is what
the final ``ip-adapter.bin`` / ``ControlNetModel/`` hold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

EMA_FILE = "ema.safetensors"
logger = logging.getLogger(__name__)


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.reset(model)

    def reset(self, model: torch.nn.Module) -> None:
        """Start the average at ``model``'s current trained weights."""
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}
        self.updates = 0

    def _pairs(self, model):
        params = dict(model.named_parameters())
        return [self.shadow[n] for n in self.names], [params[n].detach().float() for n in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        shadow, current = self._pairs(model)
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, current, alpha=1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (for export)."""
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n].to(params[n].dtype))

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        from faceid.files import atomic_path

        path = Path(folder) / EMA_FILE
        meta = {"decay": repr(self.decay), "updates": str(self.updates)}
        with atomic_path(path) as tmp:
            save_file({n: t.contiguous().cpu() for n, t in self.shadow.items()}, str(tmp), metadata=meta)
        return path

    def load(self, folder: str | Path) -> bool:
        """Restore from a checkpoint folder; ``False`` (shadow unchanged) when it holds no EMA."""
        from safetensors import safe_open

        path = Path(folder) / EMA_FILE
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            missing = [n for n in self.names if n not in f.keys()]
            if missing:
                raise ValueError(f"{path}: EMA lacks {len(missing)} trained weights, e.g. {missing[:3]}")
            for n in self.names:
                self.shadow[n].copy_(f.get_tensor(n))
        self.updates = int(meta.get("updates", 0))
        saved = float(meta.get("decay", self.decay))
        if saved != self.decay:
            logger.warning(f"{path}: EMA saved with decay {saved}, continuing with {self.decay}")
        return True
