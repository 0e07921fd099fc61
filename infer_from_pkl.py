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
# LCM(-LoRA) wants few steps and little guidance; used when --scheduler lcm is given and these are left at default.
LCM_STEPS = 6
LCM_GUIDANCE = 1.5


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
    g = p.add_argument_group("pose, img2img, inpainting, several people")
    g.add_argument(
        "--pose_image",
        default=None,
        help="take the keypoints (and, unless --width/--height, the size) from "
        "the largest face of this image",
    )
    g.add_argument("--init_image", default=None, help="img2img: start from this image (see --strength)")
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img/inpainting: share of the schedule that runs (0 keeps the image; default 0.8 / 0.85)",
    )
    g.add_argument(
        "--inpaint_image",
        default=None,
        help="face-inpaint mode: put the person into this photo in place of its (largest) face",
    )
    g.add_argument(
        "--inpaint_bbox", default=None, help="x1,y1,x2,y2 of the face to replace (default: detected)"
    )
    g.add_argument("--mask_expand", type=float, default=1.3, help="inpaint mask: face box grown this much")
    g.add_argument(
        "--mask_feather", type=float, default=0.2, help="inpaint mask: soft edge, share of the box"
    )
    g.add_argument(
        "--inpaint_size",
        type=int,
        default=1024,
        help="inpainting/face detail: generation size of the face crop",
    )
    g.add_argument(
        "--extra_face_info",
        action="append",
        default=[],
        metavar="PATH",
        help="several people: face-info file of one more person (repeatable; people go left to right)",
    )
    g.add_argument(
        "--face_boxes",
        default=None,
        help="several people: 'x1,y1,x2,y2;x1,y1,x2,y2' in output pixels "
        "(default: the faces found in --pose_image)",
    )
    g.add_argument("--region_scale", type=float, default=2.0, help="several people: region = face box x this")
    g.add_argument(
        "--face_detail",
        action="store_true",
        help="after generating, regenerate the face larger with the same identity and paste it back",
    )
    g.add_argument("--face_detail_strength", type=float, default=0.45)
    m = p.add_argument_group("LoRA and memory")
    m.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA file or folder, optional scale (repeatable; e.g. an LCM-LoRA with --scheduler lcm)",
    )
    m.add_argument(
        "--offload",
        choices=("none", "model", "sequential"),
        default="none",
        help="model: ~half the GPU memory, a little slower; sequential: least memory, much slower",
    )
    m.add_argument("--vae_slicing", action="store_true", help="decode one image of a batch at a time")
    m.add_argument("--vae_tiling", action="store_true", help="decode large images in tiles")
    m.add_argument(
        "--vae",
        default=None,
        help="another VAE folder or hub id, e.g. madebyollin/sdxl-vae-fp16-fix (fp16-safe)",
    )
    return p.parse_args(argv)


def apply_tiny(args) -> None:
    """Point every path at the tiny checkpoints and make a synthetic face when none is given."""
    from faceid.tiny.models import point_defaults_at_tiny

    # Only paths left at their defaults point into DIR: a trained --face_adapter/--controlnet is kept.
    point_defaults_at_tiny(
        args,
        {
            "base_model": BASE_MODEL_PATH,
            "controlnet": CONTROLNET_PATH,
            "face_adapter": FACE_ADAPTER,
            "face_root": ".",
        },
    )
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
    return (
        args.base_model,
        args.controlnet,
        args.face_adapter,
        args.device,
        args.dtype,
        getattr(args, "vae", None),
        tuple(getattr(args, "lora", None) or ()),
        getattr(args, "offload", "none"),
        bool(getattr(args, "vae_slicing", False)),
        bool(getattr(args, "vae_tiling", False)),
    )


def load_from_args(args):
    """The pipeline for ``args``'s weights, device and dtype, with its VAE, LoRAs and memory options."""
    from faceid.runtime import pick_device_dtype
    from pipeline_stable_diffusion_xl_instantid import apply_memory_options, load_loras, load_pipeline

    device, dtype = pick_device_dtype(args.device, args.dtype)
    vae = getattr(args, "vae", None)
    pipe = load_pipeline(
        args.base_model, args.controlnet, args.face_adapter, device=device, dtype=dtype, vae=vae
    )
    loras = getattr(args, "lora", None) or []
    if loras:
        try:
            load_loras(pipe, loras)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"--lora: {exc}") from exc
    offload = getattr(args, "offload", "none")
    apply_memory_options(
        pipe,
        offload=offload,
        vae_slicing=getattr(args, "vae_slicing", False),
        vae_tiling=getattr(args, "vae_tiling", False),
        device=device if offload != "none" else None,
    )
    return pipe


def parse_boxes(text: str) -> list[list[float]]:
    """``"x1,y1,x2,y2;x1,y1,x2,y2"`` → boxes (SystemExit naming the flag when malformed)."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.replace(" ", ";").split(";"))):
        values = part.split(",")
        try:
            box = [float(v) for v in values]
        except ValueError:
            box = []
        if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
            raise SystemExit(f"--face_boxes/--inpaint_bbox: {part!r} is not x1,y1,x2,y2 with x2>x1, y2>y1")
        boxes.append(box)
    return boxes


def plan_from_args(args, face_image, embedding, kps):
    """What to generate: ``{"mode", "size", "kps_image", ...}`` from the face and the pose/inpaint/people flags."""
    from PIL import Image

    from faceid.face.analysis import FaceAnalyzer
    from faceid.face.images import ImageLoadError, load_image
    from faceid.face.kps import draw_kps
    from pipeline_stable_diffusion_xl_instantid import detect_faces, people_inputs, pose_from_image

    analyzer = None

    def get_analyzer():
        nonlocal analyzer
        if analyzer is None:
            analyzer = FaceAnalyzer(args.face_root)
        return analyzer

    def load(path, flag):
        try:
            return load_image(path)
        except (ImageLoadError, FileNotFoundError, OSError) as exc:
            raise SystemExit(f"{flag}: {exc}") from exc

    given = (args.width, args.height) if args.width and args.height else None
    if args.inpaint_image:
        if args.pose_image or args.extra_face_info or args.init_image:
            raise SystemExit(
                "--inpaint_image works alone (not with --pose_image, --extra_face_info, --init_image)"
            )
        target = load(args.inpaint_image, "--inpaint_image")
        bbox, face_kps = None, None
        if args.inpaint_bbox:
            bbox = parse_boxes(args.inpaint_bbox)[0]
        else:
            face = get_analyzer().analyze(target)
            if face is None:
                raise SystemExit(f"--inpaint_image {args.inpaint_image}: no face found (give --inpaint_bbox)")
            bbox, face_kps = face.bbox, face.kps
        from faceid.face.regions import kps_from_bbox

        face_kps = kps_from_bbox(bbox) if face_kps is None else face_kps
        return {
            "mode": "inpaint",
            "size": target.size,
            "target": target,
            "bbox": [float(v) for v in bbox],
            "kps": face_kps,
            "kps_image": draw_kps(target.size, face_kps),
        }

    size, pose_kps = face_image.size, kps
    if args.pose_image:
        pose_img = load(args.pose_image, "--pose_image")
        try:
            pose = pose_from_image(
                get_analyzer(), pose_img, size=given, min_side=args.min_side, max_side=args.max_side
            )
        except ValueError as exc:
            raise SystemExit(f"--pose_image {args.pose_image}: {exc}") from exc
        size, pose_kps = pose["size"], pose["kps"]
    plan = {"mode": "img2img" if args.init_image else "t2i", "size": tuple(size), "kps": pose_kps}
    if args.init_image:
        plan["init_image"] = load(args.init_image, "--init_image").resize(tuple(size), Image.LANCZOS)

    if args.extra_face_info or args.face_boxes:
        from faceid.face.face_info import FaceInfoError, load_face_info

        embeddings = [embedding]
        for path in args.extra_face_info:
            try:
                embeddings.append(load_face_info(path)["embedding"])
            except (FaceInfoError, FileNotFoundError) as exc:
                raise SystemExit(f"--extra_face_info {path}: {exc}") from exc
        if args.face_boxes:
            boxes, people_kps = parse_boxes(args.face_boxes), None
        elif args.pose_image:
            found = detect_faces(get_analyzer(), pose_img)
            if len(found) < len(embeddings):
                raise SystemExit(
                    f"--pose_image {args.pose_image}: {len(found)} face(s) for {len(embeddings)} people "
                    "(give --face_boxes)"
                )
            # The largest faces, then left to right.
            found = sorted(
                found, key=lambda f: -(f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1])
            )
            found = sorted(found[: len(embeddings)], key=lambda f: f["bbox"][0] + f["bbox"][2])
            sx, sy = size[0] / pose_img.size[0], size[1] / pose_img.size[1]
            boxes = [np.asarray(f["bbox"], np.float64) * [sx, sy, sx, sy] for f in found]
            people_kps = [np.asarray(f["kps"], np.float64) * [sx, sy] for f in found]
        else:
            raise SystemExit(
                "several people (--extra_face_info) need --face_boxes or a --pose_image with faces"
            )
        if len(boxes) != len(embeddings):
            raise SystemExit(f"--face_boxes: {len(boxes)} box(es) for {len(embeddings)} people")
        faces = people_inputs(embeddings, size, boxes, kps=people_kps, region_scale=args.region_scale)
        combined = np.maximum.reduce([np.asarray(f["image"]) for f in faces])
        plan.update(
            mode="people",
            faces=faces,
            kps_image=Image.fromarray(combined),
            boxes=[list(map(float, b)) for b in boxes],
        )
        return plan
    plan["kps_image"] = draw_kps(tuple(size), pose_kps)
    return plan


def generate(pipe, args, plan, prompt, embedding, generator):
    """One image for ``prompt`` following ``plan`` (:func:`plan_from_args`)."""
    from pipeline_stable_diffusion_xl_instantid import face_detail, face_inpaint

    width, height = plan["size"]
    common = dict(
        negative_prompt=args.negative_prompt or None,  # empty: SDXL's zero embeddings
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        ip_adapter_scale=args.ip_adapter_scale,
        controlnet_conditioning_scale=args.controlnet_conditioning_scale,
        generator=generator,
    )
    if plan["mode"] == "inpaint":
        return face_inpaint(
            pipe,
            plan["target"],
            embedding,
            prompt,
            bbox=plan["bbox"],
            kps=plan["kps"],
            size=args.inpaint_size,
            expand=args.mask_expand,
            feather=args.mask_feather,
            strength=0.85 if args.strength is None else args.strength,
            **common,
        )
    if plan["mode"] == "people":
        image = pipe(prompt, faces=plan["faces"], width=width, height=height, **common).images[0]
    else:
        extra = {}
        if plan["mode"] == "img2img":
            extra = dict(
                init_image=plan["init_image"], strength=0.8 if args.strength is None else args.strength
            )
        image = pipe(
            prompt,
            image_embeds=embedding,
            image=plan["kps_image"],
            width=width,
            height=height,
            **extra,
            **common,
        ).images[0]
    if args.face_detail and plan["mode"] != "people":
        from faceid.face.regions import bbox_from_kps

        image = face_detail(
            pipe,
            image,
            embedding,
            prompt,
            bbox=bbox_from_kps(plan["kps"]),
            kps=plan["kps"],
            size=args.inpaint_size,
            strength=args.face_detail_strength,
            **common,
        )
    return image


def main(args, pipe=None):
    """Generate every prompt × seed; ``pipe`` (from :func:`load_from_args` with an equal :func:`pipeline_key`)
    skips loading the weights again."""
    import torch

    from faceid.face.face_info import FaceInfoError
    from faceid.face.images import ImageLoadError
    from faceid.files import atomic_path, write_json_atomic

    if args.tiny:
        apply_tiny(args)
    if args.scheduler == "lcm":
        if args.steps == STEPS:
            args.steps = LCM_STEPS
        if args.guidance_scale == GUIDANCE_SCALE:
            args.guidance_scale = LCM_GUIDANCE
    prompts = args.prompt or PROMPTS
    for label, path in (("face adapter", args.face_adapter), ("IdentityNet", args.controlnet)):
        if not Path(path).exists():
            raise SystemExit(f"{label} not found: {path} (run `python download.py` or pass --tiny DIR)")
    for spec in args.lora:
        from pipeline_stable_diffusion_xl_instantid import parse_lora_spec

        if not Path(parse_lora_spec(spec)[0]).exists():
            raise SystemExit(f"--lora: not found: {parse_lora_spec(spec)[0]}")
    try:
        face_image, embedding, kps = face_from_args(args)
    except (FaceInfoError, ImageLoadError) as exc:
        raise SystemExit(str(exc)) from exc
    plan = plan_from_args(args, face_image, embedding, kps)
    kps_image = plan["kps_image"]
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
    width, height = plan["size"]
    for p_idx, prompt in enumerate(prompts):
        for n in range(args.num_images):
            seed = args.seed + n
            path = out_dir / f"{p_idx:02d}_{seed}.png"
            if not (args.skip_existing and path.exists()):
                t0 = time.time()
                image = generate(
                    pipe, args, plan, prompt, embedding, torch.Generator(device="cpu").manual_seed(seed)
                )
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
    for key in (
        "face_image",
        "face_info",
        "face_adapter",
        "controlnet",
        "base_model",
        "pose_image",
        "init_image",
        "inpaint_image",
        "vae",
    ):
        value = settings.get(key)
        if value and str(value).lower() != "none" and Path(value).exists():
            settings[key] = str(Path(value).resolve())
    settings["extra_face_info"] = [str(Path(v).resolve()) for v in settings.get("extra_face_info") or []]
    settings.update(
        prompts=prompts,
        width=width,
        height=height,
        device=str(device),
        dtype=str(dtype),
        mode=plan["mode"],
        kps_image=kps_path.name,
        images=records,
    )
    for key in ("bbox", "boxes"):
        if key in plan:
            settings[f"plan_{key}"] = plan[key]
    write_json_atomic(out_dir / "settings.json", settings)
    print(f"wrote {len(records)} image(s) and {out_dir / 'settings.json'}")
    return records


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
