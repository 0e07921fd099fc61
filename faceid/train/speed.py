"""The step's speed options (``--compile``, ``--channels_last``, ``--optimizer_impl``; docs/training.md, "A faster
step"), shared by the trainer and ``benchmarks/gpu_check.py``.

* **compile**: ``torch.compile`` of the UNet's and IdentityNet's forward as :class:`TrainModel` runs them in
  training. The compiled wrappers live outside the module tree (``TrainModel.forwards``, a plain dict), so nothing
  else sees them: state-dict keys stay the modules' own (a compiled module's would gain ``_orig_mod.``), DDP wraps
  the same model in ``accelerator.prepare``, checkpoints, EMA and export read the same parameters, and validation
  (eval mode, other sizes, CFG batch) runs the plain modules instead of recompiling. Not accelerate's dynamo
  plugin (``Accelerator(dynamo_backend=...)``): it compiles the whole prepared model, Resampler and dtype casts
  included, and hands back a wrapper that every other user of the model then has to unwrap.
* **channels-last**: the 4-D convolution weights of the UNet, IdentityNet and VAE, and the image-shaped inputs of
  the forward, in ``torch.channels_last`` (NHWC): cuDNN's convolutions run without layout transposes on tensor
  cores. Parameters keep their identity; saving packs them (``.contiguous()``) as before.
* **optimizer_impl**: which of torch AdamW's three implementations runs: ``fused`` (one kernel for all tensors),
  ``foreach`` (batched per-op kernels), ``for-loop`` (one tensor at a time). ``auto``: fused where every trained
  parameter is on CUDA, else PyTorch's own default (foreach on GPUs, for-loop on the CPU).
"""

from __future__ import annotations

OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for-loop")
# What --compile uses; the tests use "aot_eager" (the same graph capture, no code generation).
COMPILE_BACKEND = "inductor"


def apply_flags(args, model, vae) -> None:
    """``--channels_last`` (UNet, IdentityNet, VAE) and ``--compile`` on a freshly loaded ``TrainModel``."""
    if getattr(args, "channels_last", False):
        set_channels_last([model.unet, model.controlnet, vae])
        model.channels_last = True
    if getattr(args, "compile", False):
        compile_forwards(
            model, getattr(args, "compile_mode", None), getattr(args, "compile_backend", COMPILE_BACKEND)
        )


def compile_forwards(model, mode: str | None = None, backend: str = COMPILE_BACKEND) -> None:
    """Run ``model``'s (a :class:`faceid.train.model.TrainModel`) UNet and IdentityNet through ``torch.compile``
    in its forward; the modules themselves stay as they are. Compilation happens at the first step."""
    import torch

    # ``dynamic=None``: sizes start static; a second size (aspect-ratio buckets) recompiles once with dynamic ones.
    kwargs = {"backend": backend} if mode in (None, "default") else {"backend": backend, "mode": mode}
    for name in ("unet", "controlnet"):
        model.forwards[name] = torch.compile(getattr(model, name), **kwargs)


def eager_forwards(model) -> None:
    """Undo :func:`compile_forwards`."""
    model.forwards.clear()


def set_channels_last(modules, on: bool = True) -> None:
    """The memory format of ``modules``' 4-D tensors (the others have none)."""
    import torch

    fmt = torch.channels_last if on else torch.contiguous_format
    for m in modules:
        m.to(memory_format=fmt)


def adamw_kwargs(impl: str, params: list) -> dict:
    """``torch.optim.AdamW``'s implementation keyword for ``impl`` (one of :data:`OPTIMIZER_IMPLS`) and the
    trained parameters."""
    return choose_adamw(impl, {p.device.type for p in params}, all(p.is_floating_point() for p in params))


def choose_adamw(impl: str, device_types: set, floating: bool = True) -> dict:
    """:func:`adamw_kwargs` from the parameters' device types."""
    from faceid.train.errors import TrainingInputError

    if impl not in OPTIMIZER_IMPLS:
        raise TrainingInputError(f"--optimizer_impl {impl}: one of {', '.join(OPTIMIZER_IMPLS)}")
    fusable = bool(device_types) and floating and set(device_types) <= set(fused_devices())
    if impl == "auto":
        return {"fused": True} if fusable and set(device_types) == {"cuda"} else {}
    if impl == "fused" and not fusable:
        raise TrainingInputError(
            f"--optimizer_impl fused: this PyTorch has no fused AdamW for {', '.join(sorted(device_types))} "
            f"(it has one for {', '.join(fused_devices())}); use foreach or auto"
        )
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]


def fused_devices() -> list[str]:
    """The device types with a fused AdamW kernel in this PyTorch (cuda; cpu from 2.4; ...)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return list(_get_fused_kernels_supported_devices())


def adamw_impl_name(optimizer) -> str:
    """Which implementation a torch AdamW runs (what ``auto`` chose): fused, foreach or for-loop."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    foreach = group.get("foreach")
    if foreach is None:  # PyTorch's default, decided at each step from the parameters
        params = [p for g in optimizer.param_groups for p in g["params"]]
        foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    return "foreach" if foreach else "for-loop"
