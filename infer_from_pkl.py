"""Generate images of a person from a face-info file (``.pkl``/``.npz`` with ``embedding`` and ``kps``).

Edit the paths and prompts below, or override any of them with a flag::

    python infer_from_pkl.py --face_image me.jpg --face_info me.pkl --prompt "a knight" --num_images 4
    python infer_from_pkl.py --tiny tiny          # fully offline on tiny weights (built if missing)
    python infer_from_pkl.py --pose_image pose.jpg            # keypoints (and size) from another photo's face
    python infer_from_pkl.py --inpaint_image group.jpg        # put the person into a photo, in place of its face
    python infer_from_pkl.py --extra_face_info b.pkl --pose_image two_people.jpg   # several people
    python infer_from_pkl.py --lora lcm-lora-sdxl:1.0 --scheduler lcm              # fast mode
    python infer_from_pkl.py --offload model --vae_slicing --vae madebyollin/sdxl-vae-fp16-fix  # small GPUs

Writes ``OUTPUT_DIR/<prompt#>_<seed>.png`` and ``OUTPUT_DIR/settings.json`` (every setting used, and one entry
per image: ``path``, ``prompt``, ``seed``, ``face_image``, ``face_info``), which ``evaluate.py`` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceid.generation import batch
from faceid.generation.defaults import shrink_for_tiny

# ---- defaults: edit these ----------------------------------------------------------------------
BASE_MODEL_PATH = "stabilityai/stable-diffusion-xl-base-1.0"
FACE_ADAPTER = "checkpoints/ip-adapter.bin"
CONTROLNET_PATH = "checkpoints/ControlNetModel"
FACE_IMAGE = "examples/face.jpg"
FACE_INFO = (
    "examples/face.pkl"  # made by: python get_face_info.py --face_image examples/face.jpg --output ...
)
PROMPTS = [
    "analog film photo of a person in a cafe, smiling, 35mm photograph, film grain, highly detailed",
    "portrait of a person as an astronaut, looking to the side, cinematic lighting",
]
OUTPUT_DIR = "outputs"
NUM_IMAGES = 1  # per prompt
# Steps, guidance, scales, negative prompt and the LCM settings: faceid/generation/defaults.py (shared with app.py).
# ------------------------------------------------------------------------------------------------


PATHS = dict(
    base_model=BASE_MODEL_PATH,
    face_adapter=FACE_ADAPTER,
    controlnet=CONTROLNET_PATH,
    face_image=FACE_IMAGE,
    face_info=FACE_INFO,
    output_dir=OUTPUT_DIR,
    num_images=NUM_IMAGES,
)


def parse_args(argv=None):
    return batch.build_parser(PATHS, description=__doc__.split("\n\n")[0]).parse_args(argv)


def apply_tiny(args) -> None:
    """Point every path at the tiny checkpoints and make a synthetic face when none is given."""
    from faceid.tiny.models import point_defaults_at_tiny

    # Only paths left at their defaults point into DIR: a trained --face_adapter/--controlnet is kept.
    paths = dict(base_model=BASE_MODEL_PATH, controlnet=CONTROLNET_PATH, face_adapter=FACE_ADAPTER)
    point_defaults_at_tiny(args, dict(paths, face_root="."))
    if args.face_image == FACE_IMAGE:
        from faceid.face.face_info import save_face_info
        from faceid.tiny.faces import synthetic_face_array, write_synthetic_face

        args.face_image = str(write_synthetic_face(Path(args.tiny) / "examples" / "face.png"))
        if args.face_info == FACE_INFO:  # the synthetic face's own geometry and a fixed embedding
            _, kps = synthetic_face_array()
            emb = np.random.default_rng(0).standard_normal(512).astype(np.float32) * 20
            args.face_info = str(Path(args.tiny) / "examples" / "face.npz")
            save_face_info(args.face_info, {"embedding": emb, "kps": kps, "frame": np.array([256, 256])})
    shrink_for_tiny(args)


def load_from_args(args):
    """The pipeline for ``args``'s weights, device and dtype, with its VAE, LoRAs and memory options."""
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    return batch.load_from_args(args, load_pipeline)


def main(args, pipe=None):
    """Generate every prompt × seed; ``pipe`` (from :func:`load_from_args` with an equal
    :func:`faceid.generation.batch.pipeline_key`) skips loading the weights again."""
    if args.tiny:
        apply_tiny(args)
    return batch.run(args, args.prompt or PROMPTS, lambda: pipe if pipe is not None else load_from_args(args))


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
