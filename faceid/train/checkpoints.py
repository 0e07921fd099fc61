"""Training checkpoints: complete-or-absent ``checkpoint-N/`` folders, ``latest`` lookup, pruning, and the
accelerate hooks that save only trained weights, in the layouts inference loads.

A checkpoint is written as ``.checkpoint-N.partial/`` by every process (accelerate state: optimizer,
scheduler, per-process RNG), plus ``ip-adapter.bin``, ``ip-adapter.safetensors`` (official layout),
``ControlNetModel/`` (diffusers) and finally ``trainer_state.json``; the main process then renames it to
``checkpoint-N/``. A folder without ``trainer_state.json`` or with the ``.partial`` name is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from faceid.files import apply_umask, write_json_atomic
from faceid.train.errors import TrainingInputError

STATE_FILE = "trainer_state.json"
ADAPTER_BIN = "ip-adapter.bin"
ADAPTER_SAFETENSORS = "ip-adapter.safetensors"
CONTROLNET_DIR = "ControlNetModel"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class MissingCheckpointError(TrainingInputError, FileNotFoundError):
    """``--resume_from_checkpoint`` names something that is not a complete checkpoint."""


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of complete checkpoints, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``latest`` → the newest complete checkpoint (or None); a path must be a complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not (path / STATE_FILE).is_file():
        raise MissingCheckpointError(
            f"{path}: not a complete checkpoint (no {STATE_FILE}); pass --resume_from_checkpoint latest or the "
            f"path of a checkpoint-N folder"
        )
    return path


def read_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def prune(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; return the deleted paths."""
    if not total_limit or total_limit <= 0:
        return []
    found = complete_checkpoints(output_dir)
    doomed = [p for _, p in found[: max(0, len(found) - total_limit)]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def export_weights(out_dir: str | os.PathLike, model, safetensors: bool = True) -> None:
    """Write ``ip-adapter.bin`` (+ ``.safetensors``) and ``ControlNetModel/`` from a :class:`TrainModel`."""
    from ip_adapter.weights import ip_layers_state, write_adapter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_proj = {k: v.detach().float() for k, v in model.image_proj.state_dict().items()}
    ip = {k: v.detach().float() for k, v in ip_layers_state(model.unet).items()}
    write_adapter(out_dir / ADAPTER_BIN, image_proj, ip)
    if safetensors:
        write_adapter(out_dir / ADAPTER_SAFETENSORS, image_proj, ip)
    tmp = out_dir / f".{CONTROLNET_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.controlnet.save_pretrained(tmp, safe_serialization=True)
    apply_umask(tmp)  # safetensors writes 0600 whatever the umask
    final = out_dir / CONTROLNET_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def load_trained_weights(in_dir: str | os.PathLike, model) -> None:
    """Inverse of :func:`export_weights` (exact: everything is stored in the trained dtype, fp32)."""
    from safetensors.torch import load_file

    from ip_adapter.weights import check_state, ip_modules, read_adapter

    in_dir = Path(in_dir)
    adapter = in_dir / ADAPTER_SAFETENSORS
    image_proj, ip = read_adapter(adapter if adapter.exists() else in_dir / ADAPTER_BIN)
    _copy_into(model.image_proj, image_proj)
    layers = ip_modules(model.unet)
    check_state(layers, ip, f"{in_dir} ip_adapter weights")
    _copy_into(layers, ip)
    cn = in_dir / CONTROLNET_DIR
    files = sorted(cn.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    _copy_into(model.controlnet, state)


def _copy_into(module: torch.nn.Module, state: dict) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} keys, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def register_hooks(accelerator, unwrap) -> None:
    """Make ``accelerator.save_state``/``load_state`` store the trained model as exported weights (not the
    frozen UNet), so a checkpoint is small and directly loadable by inference."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                export_weights(output_dir, unwrap(model))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_trained_weights(input_dir, unwrap(models.pop()))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_disk_full(output_dir, partial: Path, final: Path):
    """Disk full while writing a checkpoint: the partial folder goes, the message names the last complete one."""
    from faceid.files import removed_on_disk_full

    done = complete_checkpoints(output_dir)
    intact = (
        f"{final.name} was not written (partial files removed); {done[-1][1]} is intact"
        if done
        else f"{final.name} was not written (partial files removed); no earlier checkpoint exists"
    )
    resume = "free some space, then rerun the same command with --resume_from_checkpoint latest"
    return removed_on_disk_full(partial, intact, resume)


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, state: dict, total_limit=None, write_extra=None
):
    """Write ``checkpoint-<step>`` atomically (all processes must call this). ``write_extra(folder)`` adds files
    (the EMA) on the main process before the state file marks the checkpoint complete. Returns the final path."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with checkpoint_disk_full(output_dir, partial, final):
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(partial)
            write_json_atomic(partial / STATE_FILE, state)
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        prune(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final
