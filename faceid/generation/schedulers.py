"""The schedulers a generation can ask for by name, switched on a loaded pipeline."""

from __future__ import annotations

SCHEDULERS = ("default", "euler", "euler_a", "dpm++", "lcm", "ddim")
_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
    "ddim": "DDIMScheduler",
}


def set_scheduler(pipe, name: str) -> None:
    """Use scheduler ``name``; "default" restores the one the model came with (a reused pipeline may have been
    switched by an earlier call)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    if not hasattr(pipe, "_default_scheduler"):
        pipe._default_scheduler = pipe.scheduler
    default = pipe._default_scheduler
    pipe.scheduler = (
        default if name == "default" else getattr(diffusers, _CLASSES[name]).from_config(default.config)
    )
