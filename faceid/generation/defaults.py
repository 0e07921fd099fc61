"""One set of generation defaults for every entry point (``infer_from_pkl.py``, ``app.py``, evaluation), the
``--tiny`` shrinking rule and the "weights exist" check. Scripts keep their paths at their top; the numbers that
decide what an image looks like live here once."""

from __future__ import annotations

from pathlib import Path

NEGATIVE_PROMPT = (
    "(lowres, low quality, worst quality:1.2), (text:1.2), watermark, painting, drawing, illustration, "
    "glitch, deformed, mutated, cross-eyed, ugly, disfigured"
)
SEED = 42
STEPS = 30
GUIDANCE_SCALE = 5.0
IP_ADAPTER_SCALE = 0.8
CONTROLNET_SCALE = 0.8
# LCM(-LoRA) wants few steps and little guidance: what --scheduler lcm / the app's fast mode use (the official
# InstantID demo's fast mode: 5 steps, guidance 1.5).
LCM_STEPS = 5
LCM_GUIDANCE = 1.5
MIN_SIDE, MAX_SIDE = 1024, 1280  # output size from the pose (or face) image, like the official demo
IMG2IMG_STRENGTH = 0.8  # share of the schedule that runs from an init image
INPAINT_STRENGTH = 0.85  # target photo: share of the schedule that runs on the face crop
INPAINT_SIZE = 1024  # target photo / face detail: generation size of the face crop (longer side)
MASK_EXPAND = 1.3  # target photo: the face box grown this much is regenerated
MASK_FEATHER = 0.2  # ... with a soft edge of this share of the box
FACE_DETAIL_STRENGTH = 0.45  # face detail: low, so the composition stays
REGION_SCALE = 2.0  # several people: each person's region is their face box grown this much

# --tiny: sizes and steps left at their defaults shrink to what the tiny weights run in seconds.
TINY_SIDE = 64
TINY_STEPS = 4


def shrink_for_tiny(args) -> None:
    """The ``--tiny`` rule: ``min_side``/``max_side``, ``steps`` and ``inpaint_size`` (when ``args`` has them)
    still at their defaults become the tiny sizes; values given explicitly are kept."""
    if (args.min_side, args.max_side) == (MIN_SIDE, MAX_SIDE):
        args.min_side = args.max_side = TINY_SIDE
    if args.steps == STEPS:
        args.steps = TINY_STEPS
    if getattr(args, "inpaint_size", None) == INPAINT_SIZE:
        args.inpaint_size = TINY_SIDE


def check_weights(face_adapter, controlnet) -> None:
    """``FileNotFoundError`` naming the first missing file and what to do (before anything is loaded)."""
    for label, path in (("face adapter", face_adapter), ("IdentityNet", controlnet)):
        if not Path(path).exists():
            raise FileNotFoundError(
                f"{label} not found: {path} (run `python download.py` or pass --tiny DIR)"
            )
