"""Generate images of a person from a face-info file (``.pkl``/``.npz`` with ``embedding`` and ``kps``).

Edit the paths and prompts below, or override any of them with a flag::

    python infer_from_pkl.py --face_image me.jpg --face_info me.pkl --prompt "a knight" --num_images 4
    python infer_from_pkl.py --tiny tiny          # fully offline on tiny weights (built if missing)

Writes ``OUTPUT_DIR/<prompt#>_<seed>.png`` and ``OUTPUT_DIR/settings.json`` (every setting used, and one entry
per image: ``path``, ``prompt``, ``seed``, ``face_image``, ``face_info``), which ``evaluate.py`` reads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

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
NEGATIVE_PROMPT = (
    "(lowres, low quality, worst quality:1.2), (text:1.2), watermark, painting, drawing, illustration, "
    "glitch, deformed, mutated, cross-eyed, ugly, disfigured"
)
OUTPUT_DIR = "outputs"
NUM_IMAGES = 1  # per prompt
SEED = 42
STEPS = 30
GUIDANCE_SCALE = 5.0
IP_ADAPTER_SCALE = 0.8
CONTROLNET_SCALE = 0.8
# ------------------------------------------------------------------------------------------------

SCHEDULERS = ("default", "euler", "euler_a", "dpm++", "lcm", "ddim")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_model", default=BASE_MODEL_PATH, help="SDXL diffusers folder or hub id")
    p.add_argument(
        "--face_adapter", default=FACE_ADAPTER, help="ip-adapter.bin / .safetensors (official layout)"
    )
    p.add_argument("--controlnet", default=CONTROLNET_PATH, help="IdentityNet folder (ControlNetModel)")
    p.add_argument("--face_image", default=FACE_IMAGE)
    p.add_argument(
        "--face_info", default=FACE_INFO, help=".pkl or .npz; 'none' to analyse --face_image instead"
    )
    p.add_argument(
        "--face_root", default=".", help="folder holding models/antelopev2 (used when --face_info none)"
    )
    p.add_argument("--prompt", action="append", help="repeatable; default: the PROMPTS list in this file")
    p.add_argument("--negative_prompt", default=NEGATIVE_PROMPT)
    p.add_argument(
        "--num_images", type=int, default=NUM_IMAGES, help="images per prompt (seeds seed, seed+1, ...)"
    )
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--ip_adapter_scale", type=float, default=IP_ADAPTER_SCALE)
    p.add_argument("--controlnet_conditioning_scale", type=float, default=CONTROLNET_SCALE)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="default")
    p.add_argument("--width", type=int, default=None, help="output size; default: the face image resized")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--min_side", type=int, default=1024)
    p.add_argument("--max_side", type=int, default=1280)
    p.add_argument("--output_dir", default=OUTPUT_DIR)
    p.add_argument("--skip_existing", action="store_true", help="keep images already in --output_dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    p.add_argument(
        "--tiny",
        default=None,
        metavar="DIR",
        help="use the tiny offline checkpoints in DIR (built if missing)",
    )
    return p.parse_args(argv)


def apply_tiny(args) -> None:
    """Point every path at the tiny checkpoints and make a synthetic face when none is given."""
    from faceid.tiny.models import build_tiny, tiny_paths

    paths = tiny_paths(args.tiny)
    build_tiny(args.tiny)
    # Only paths left at their defaults point into DIR: a trained --face_adapter/--controlnet is kept.
    for attr, default, key in (
        ("base_model", BASE_MODEL_PATH, "base_model"),
        ("controlnet", CONTROLNET_PATH, "controlnet"),
        ("face_adapter", FACE_ADAPTER, "face_adapter"),
        ("face_root", ".", "face_root"),
    ):
        if getattr(args, attr) == default:
            setattr(args, attr, str(paths[key]))
    if args.face_image == FACE_IMAGE:
        from faceid.face.face_info import save_face_info
        from faceid.tiny.faces import synthetic_face_array, write_synthetic_face

        args.face_image = str(write_synthetic_face(Path(args.tiny) / "examples" / "face.png"))
        if args.face_info == FACE_INFO:  # the synthetic face's own geometry and a fixed embedding
            _, kps = synthetic_face_array()
            emb = np.random.default_rng(0).standard_normal(512).astype(np.float32) * 20
            args.face_info = str(Path(args.tiny) / "examples" / "face.npz")
            save_face_info(args.face_info, {"embedding": emb, "kps": kps, "frame": np.array([256, 256])})
    if args.min_side == 1024 and args.max_side == 1280:
        args.min_side = args.max_side = 64
    if args.steps == STEPS:
        args.steps = 4


def face_from_args(args):
    """→ (resized face image, embedding [512], keypoints in the resized frame)."""
    from faceid.face.face_info import load_face_info
    from faceid.face.images import load_image
    from faceid.face.kps import fit_size, scale_kps

    image = load_image(args.face_image)
    if args.face_info and args.face_info.lower() != "none":
        info = load_face_info(args.face_info)
    else:
        from faceid.face.analysis import FaceAnalyzer

        face = FaceAnalyzer(args.face_root).analyze(image)
        if face is None:
            raise SystemExit(f"{args.face_image}: no face found")
        info = {"embedding": face.embedding, "kps": face.kps, "frame": face.frame}
    frame = tuple(info.get("frame") or image.size)
    if args.width and args.height:
        size = (args.width, args.height)
    else:
        size = fit_size(*image.size, min_side=args.min_side, max_side=args.max_side)
    kps = scale_kps(info["kps"], frame, size)
    return image.resize(size), info["embedding"], kps


def set_scheduler(pipe, name: str) -> None:
    """Use scheduler ``name``; "default" restores the one the model came with (a reused pipeline may have been
    switched by an earlier call)."""
    import diffusers

    if not hasattr(pipe, "_default_scheduler"):
        pipe._default_scheduler = pipe.scheduler

    classes = {
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "dpm++": "DPMSolverMultistepScheduler",
        "lcm": "LCMScheduler",
        "ddim": "DDIMScheduler",
    }
    default = pipe._default_scheduler
    pipe.scheduler = (
        default if name == "default" else getattr(diffusers, classes[name]).from_config(default.config)
    )


def pipeline_key(args) -> tuple:
    """What identifies a loaded pipeline: callers that keep one (the evaluation grid) reuse it while this is equal."""
    return (args.base_model, args.controlnet, args.face_adapter, args.device, args.dtype)


def load_from_args(args):
    """The pipeline for ``args``'s weights, device and dtype."""
    from faceid.runtime import pick_device_dtype
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    device, dtype = pick_device_dtype(args.device, args.dtype)
    return load_pipeline(args.base_model, args.controlnet, args.face_adapter, device=device, dtype=dtype)


def main(args, pipe=None):
    """Generate every prompt × seed; ``pipe`` (from :func:`load_from_args` with an equal :func:`pipeline_key`)
    skips loading the weights again."""
    import torch

    from faceid.face.face_info import FaceInfoError
    from faceid.face.images import ImageLoadError
    from faceid.face.kps import draw_kps
    from faceid.files import atomic_path, write_json_atomic

    if args.tiny:
        apply_tiny(args)
    prompts = args.prompt or PROMPTS
    for label, path in (("face adapter", args.face_adapter), ("IdentityNet", args.controlnet)):
        if not Path(path).exists():
            raise SystemExit(f"{label} not found: {path} (run `python download.py` or pass --tiny DIR)")
    try:
        face_image, embedding, kps = face_from_args(args)
    except (FaceInfoError, ImageLoadError) as exc:
        raise SystemExit(str(exc)) from exc
    kps_image = draw_kps(face_image, kps)
    if pipe is None:
        pipe = load_from_args(args)
    device, dtype = pipe.device, pipe.unet.dtype
    set_scheduler(pipe, args.scheduler)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kps_path = out_dir / "kps.png"
    with atomic_path(kps_path) as tmp:
        kps_image.save(tmp, format="PNG")
    records = []
    width, height = face_image.size
    for p_idx, prompt in enumerate(prompts):
        for n in range(args.num_images):
            seed = args.seed + n
            path = out_dir / f"{p_idx:02d}_{seed}.png"
            if not (args.skip_existing and path.exists()):
                t0 = time.time()
                image = pipe(
                    prompt,
                    negative_prompt=args.negative_prompt,
                    image_embeds=embedding,
                    image=kps_image,
                    width=width,
                    height=height,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    ip_adapter_scale=args.ip_adapter_scale,
                    controlnet_conditioning_scale=args.controlnet_conditioning_scale,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                ).images[0]
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                print(f"[{p_idx}:{seed}] {path} ({time.time() - t0:.1f}s)")
            records.append(
                {
                    "path": path.name,
                    "prompt": prompt,
                    "seed": seed,
                    "face_image": str(Path(args.face_image).resolve()),
                    "face_info": None
                    if str(args.face_info).lower() == "none"
                    else str(Path(args.face_info).resolve()),
                }
            )
    settings = dict(vars(args))
    for key in ("face_image", "face_info", "face_adapter", "controlnet", "base_model"):
        value = settings.get(key)
        if value and str(value).lower() != "none" and Path(value).exists():
            settings[key] = str(Path(value).resolve())
    settings.update(
        prompts=prompts,
        width=width,
        height=height,
        device=str(device),
        dtype=str(dtype),
        kps_image=kps_path.name,
        images=records,
    )
    write_json_atomic(out_dir / "settings.json", settings)
    print(f"wrote {len(records)} image(s) and {out_dir / 'settings.json'}")
    return records


if __name__ == "__main__":
    from faceid.cli import run

    run(main, parse_args)
