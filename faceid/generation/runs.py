"""The weights a comparison can choose from: the base weights the app was started with, every complete
``checkpoint-N/`` of a training run (oldest first) and the run's final export."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from faceid.errors import InputError
from faceid.eval.grid import checkpoint_paths
from faceid.train.checkpoints import complete_checkpoints

BASE_LABEL = "base"
FINAL_LABEL = "final"


@dataclass(frozen=True)
class Weights:
    """One IdentityNet + face adapter pair (the base SDXL is shared by all)."""

    label: str
    face_adapter: str
    controlnet: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.face_adapter, self.controlnet)


def _weights(label: str, folder: Path) -> Weights | None:
    try:
        adapter, controlnet = checkpoint_paths(folder)
    except InputError:  # no adapter or no ControlNetModel/ in it: not loadable, so not offered
        return None
    return Weights(label, adapter, controlnet)


def run_weights(run_dir: str | os.PathLike | None, base: Weights | None = None) -> list[Weights]:
    """``[base, checkpoint-N..., final]``: complete checkpoints only (a folder being written is skipped)."""
    out = [base] if base is not None else []
    if not run_dir:
        return out
    root = Path(run_dir)
    for step, folder in complete_checkpoints(root):
        w = _weights(f"checkpoint-{step}", folder)
        if w is not None:
            out.append(w)
    if (root / "ControlNetModel" / "config.json").is_file():
        w = _weights(FINAL_LABEL, root)
        if w is not None:
            out.append(w)
    return out
