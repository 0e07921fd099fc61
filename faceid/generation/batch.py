"""A batch of images from a face-info file: the inference flags (``infer_from_pkl.py``'s command line, also what the
evaluation grid runs), their checks, and the run that writes ``<prompt#>_<seed>.png`` + ``settings.json``.

Every image goes through the one generation path (:func:`faceid.generation.request.generate`). Bad input raises
:class:`faceid.errors.InputError` naming the flag; the scripts turn it into a message.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from faceid.errors import InputError
from faceid.generation.defaults import (
    CONTROLNET_SCALE,
    FACE_DETAIL_STRENGTH,
    GUIDANCE_SCALE,
    INPAINT_SIZE,
    IP_ADAPTER_SCALE,
    LCM_GUIDANCE,
    LCM_STEPS,
    MASK_EXPAND,
    MASK_FEATHER,
    MAX_SIDE,
    MIN_SIDE,
    NEGATIVE_PROMPT,
    REGION_SCALE,
    SEED,
    STEPS,
    check_weights,
)
from faceid.generation.memory import OFFLOAD_CHOICES
from faceid.generation.schedulers import SCHEDULERS

# The official layout's paths (download.py); a script passes its own editable ones to build_parser.
PATHS = {
    "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
    "face_adapter": "checkpoints/ip-adapter.bin",
    "controlnet": "checkpoints/ControlNetModel",
    "face_image": "examples/face.jpg",
    "face_info": "examples/face.pkl",
    "output_dir": "outputs",
    "num_images": 1,
}


def build_parser(paths: dict | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The inference flags; ``paths`` overrides :data:`PATHS` (a script's editable defaults)."""
    d = dict(PATHS, **(paths or {}))
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base_model", default=d["base_model"], help="SDXL diffusers folder or hub id")
    p.add_argument(
        "--face_adapter", default=d["face_adapter"], help="ip-adapter.bin / .safetensors (official layout)"
    )
    p.add_argument("--controlnet", default=d["controlnet"], help="IdentityNet folder (ControlNetModel)")
    p.add_argument("--face_image", default=d["face_image"])
    p.add_argument(
        "--face_info", default=d["face_info"], help=".pkl or .npz; 'none' to analyse --face_image instead"
    )
    p.add_argument(
        "--face_root", default=".", help="folder holding models/antelopev2 (used when --face_info none)"
    )
    p.add_argument("--prompt", action="append", help="repeatable; default: the PROMPTS list of the script")
    p.add_argument("--negative_prompt", default=NEGATIVE_PROMPT)
    p.add_argument(
        "--num_images", type=int, default=d["num_images"], help="images per prompt (seeds seed, seed+1, ...)"
    )
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--ip_adapter_scale", type=float, default=IP_ADAPTER_SCALE)
    p.add_argument("--controlnet_conditioning_scale", type=float, default=CONTROLNET_SCALE)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="default")
    p.add_argument("--width", type=int, default=None, help="output size; default: the face image resized")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--min_side", type=int, default=MIN_SIDE)
    p.add_argument("--max_side", type=int, default=MAX_SIDE)
    p.add_argument("--output_dir", default=d["output_dir"])
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
    g.add_argument(
        "--mask_expand", type=float, default=MASK_EXPAND, help="inpaint mask: face box grown this much"
    )
    g.add_argument(
        "--mask_feather", type=float, default=MASK_FEATHER, help="inpaint mask: soft edge, share of the box"
    )
    g.add_argument(
        "--inpaint_size",
        type=int,
        default=INPAINT_SIZE,
        help="inpainting/face detail: generation size of the face crop",
    )
    g.add_argument(
        "--extra_face_info",
        action="append",
        default=[],
        metavar="PATH",
        help="several people: face-info file of one more person (repeatable; people go left to right among the "
        "largest faces of --pose_image)",
    )
    g.add_argument(
        "--face_boxes",
        default=None,
        help="several people: 'x1,y1,x2,y2;x1,y1,x2,y2' in output pixels "
        "(default: the faces found in --pose_image)",
    )
    g.add_argument(
        "--region_scale", type=float, default=REGION_SCALE, help="several people: region = face box x this"
    )
    g.add_argument(
        "--face_detail",
        action="store_true",
        help="after generating, regenerate the face larger with the same identity and paste it back",
    )
    g.add_argument("--face_detail_strength", type=float, default=FACE_DETAIL_STRENGTH)
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
        choices=OFFLOAD_CHOICES,
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
    return p


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
            raise InputError(f"{args.face_image}: no face found")
        info = {"embedding": face.embedding, "kps": face.kps, "frame": face.frame}
    frame = tuple(info.get("frame") or image.size)
    if args.width and args.height:
        size = (args.width, args.height)
    else:
        size = fit_size(*image.size, min_side=args.min_side, max_side=args.max_side)
    kps = scale_kps(info["kps"], frame, size)
    return image.resize(size), info["embedding"], kps


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


def load_from_args(args, load_pipeline):
    """``load_pipeline`` (the pipeline module's, passed in: packages never import scripts) for ``args``'s weights,
    device and dtype, with its VAE, LoRAs and memory options."""
    from faceid.generation.loras import LoraError
    from faceid.runtime import pick_device_dtype

    device, dtype = pick_device_dtype(args.device, args.dtype)
    try:
        return load_pipeline(
            args.base_model,
            args.controlnet,
            args.face_adapter,
            device=device,
            dtype=dtype,
            vae=getattr(args, "vae", None),
            loras=getattr(args, "lora", None) or (),
            offload=getattr(args, "offload", "none"),
            vae_slicing=getattr(args, "vae_slicing", False),
            vae_tiling=getattr(args, "vae_tiling", False),
        )
    except LoraError as exc:
        raise InputError(f"--lora: {exc}") from exc


def parse_boxes(text: str) -> list[list[float]]:
    """``"x1,y1,x2,y2;x1,y1,x2,y2"`` → boxes (InputError naming the flag when malformed)."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.replace(" ", ";").split(";"))):
        values = part.split(",")
        try:
            box = [float(v) for v in values]
        except ValueError:
            box = []
        if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
            raise InputError(f"--face_boxes/--inpaint_bbox: {part!r} is not x1,y1,x2,y2 with x2>x1, y2>y1")
        boxes.append(box)
    return boxes


def _image_flag(path, flag):
    from faceid.face.images import ImageLoadError, load_image

    try:
        return load_image(path)
    except (ImageLoadError, FileNotFoundError, OSError) as exc:
        raise InputError(f"{flag}: {exc}") from exc


def _people(args, embedding, size, pose_img, get_analyzer) -> list[dict]:
    """Person 1 (the face) and one person per ``--extra_face_info``: boxes from ``--face_boxes`` or the largest
    faces of ``--pose_image``, left to right (:func:`faceid.generation.composition.people_from_detections`)."""
    from faceid.face.face_info import FaceInfoError, load_face_info
    from faceid.face.images import to_bgr
    from faceid.generation.composition import people_from_detections

    embeddings = [embedding]
    for path in args.extra_face_info:
        try:
            embeddings.append(load_face_info(path)["embedding"])
        except (FaceInfoError, FileNotFoundError) as exc:
            raise InputError(f"--extra_face_info {path}: {exc}") from exc
    if args.face_boxes:
        boxes = parse_boxes(args.face_boxes)
        if len(boxes) != len(embeddings):
            raise InputError(f"--face_boxes: {len(boxes)} box(es) for {len(embeddings)} people")
        people_kps = [None] * len(boxes)
    elif pose_img is not None:
        det = get_analyzer().detect(to_bgr(pose_img))
        try:
            boxes, people_kps = people_from_detections(
                det.bboxes, det.kpss, len(embeddings), pose_img.size, size
            )
        except ValueError as exc:
            raise InputError(f"--pose_image {args.pose_image}: {exc} (give --face_boxes)") from exc
    else:
        raise InputError("several people (--extra_face_info) need --face_boxes or a --pose_image with faces")
    return [
        {"embeds": e, "bbox": np.asarray(b, np.float64), "kps": k}
        for e, b, k in zip(embeddings, boxes, people_kps)
    ]


def request_from_args(args, face_image, embedding, kps, prompt: str):
    """The :class:`~faceid.generation.request.GenerationRequest` for ``prompt`` from the face and the
    pose/inpaint/people flags."""
    from PIL import Image

    from faceid.face.analysis import FaceAnalyzer
    from faceid.generation.composition import pose_from_image
    from faceid.generation.request import GenerationRequest

    analyzer = None

    def get_analyzer():
        nonlocal analyzer
        if analyzer is None:
            analyzer = FaceAnalyzer(args.face_root)
        return analyzer

    options = dict(
        prompt=prompt,
        embeds=embedding,
        negative_prompt=args.negative_prompt or None,  # empty: SDXL's zero embeddings
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        ip_adapter_scale=args.ip_adapter_scale,
        controlnet_conditioning_scale=args.controlnet_conditioning_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        num_images=args.num_images,
        inpaint_size=args.inpaint_size,
        mask_expand=args.mask_expand,
        mask_feather=args.mask_feather,
        region_scale=args.region_scale,
        face_detail=args.face_detail,
        face_detail_strength=args.face_detail_strength,
    )
    if args.strength is not None:
        options.update(strength=args.strength, inpaint_strength=args.strength)
    given = (args.width, args.height) if args.width and args.height else None
    if args.inpaint_image:
        if args.pose_image or args.extra_face_info or args.init_image:
            raise InputError(
                "--inpaint_image works alone (not with --pose_image, --extra_face_info, --init_image)"
            )
        from faceid.face.regions import kps_from_bbox

        target = _image_flag(args.inpaint_image, "--inpaint_image")
        bbox, face_kps = None, None
        if args.inpaint_bbox:
            bbox = parse_boxes(args.inpaint_bbox)[0]
        else:
            face = get_analyzer().analyze(target)
            if face is None:
                raise InputError(f"--inpaint_image {args.inpaint_image}: no face found (give --inpaint_bbox)")
            bbox, face_kps = face.bbox, face.kps
        face_kps = kps_from_bbox(bbox) if face_kps is None else face_kps
        bbox = [float(v) for v in bbox]
        return GenerationRequest(kps=face_kps, size=target.size, target=target, face_bbox=bbox, **options)

    size, pose_kps, pose_img = face_image.size, kps, None
    if args.pose_image:
        pose_img = _image_flag(args.pose_image, "--pose_image")
        try:
            pose = pose_from_image(
                get_analyzer(), pose_img, size=given, min_side=args.min_side, max_side=args.max_side
            )
        except ValueError as exc:
            raise InputError(f"--pose_image {args.pose_image}: {exc}") from exc
        size, pose_kps = pose["size"], pose["kps"]
    size = tuple(size)
    if args.init_image:
        options["init_image"] = _image_flag(args.init_image, "--init_image").resize(size, Image.LANCZOS)
    if args.extra_face_info or args.face_boxes:
        options["people"] = _people(args, embedding, size, pose_img, get_analyzer)
    return GenerationRequest(kps=pose_kps, size=size, **options)


def run(args, prompts: list[str], get_pipe) -> list[dict]:
    """Generate every prompt × seed into ``args.output_dir`` with settings.json; ``get_pipe()`` gives the pipeline
    (called once the inputs are checked, so a bad flag fails before the weights load). Returns the image records."""
    from dataclasses import replace

    from faceid.face.face_info import FaceInfoError
    from faceid.face.images import ImageLoadError
    from faceid.files import atomic_path, write_json_atomic
    from faceid.generation.loras import parse_lora_spec
    from faceid.generation.request import generate

    if args.scheduler == "lcm":
        if args.steps == STEPS:
            args.steps = LCM_STEPS
        if args.guidance_scale == GUIDANCE_SCALE:
            args.guidance_scale = LCM_GUIDANCE
    try:
        check_weights(args.face_adapter, args.controlnet)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from exc
    for spec in args.lora:
        if not Path(parse_lora_spec(spec)[0]).exists():
            raise InputError(f"--lora: not found: {parse_lora_spec(spec)[0]}")
    try:
        face_image, embedding, kps = face_from_args(args)
    except (FaceInfoError, ImageLoadError) as exc:
        raise InputError(str(exc)) from exc
    request = request_from_args(args, face_image, embedding, kps, prompts[0])
    pipe = get_pipe()
    device, dtype = pipe.device, pipe.unet.dtype

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kps_path = out_dir / "kps.png"
    with atomic_path(kps_path) as tmp:
        request.kps_image.save(tmp, format="PNG")
    records = []
    width, height = request.size
    for p_idx, prompt in enumerate(prompts):
        for seed in request.seeds():
            path = out_dir / f"{p_idx:02d}_{seed}.png"
            if not (args.skip_existing and path.exists()):
                t0 = time.time()
                (image,) = generate(pipe, replace(request, prompt=prompt, seed=seed, num_images=1))
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
        mode=request.mode,
        kps_image=kps_path.name,
        images=records,
    )
    if request.mode == "inpaint":
        settings["plan_bbox"] = [float(v) for v in request.face_bbox]
    if request.mode == "people":
        settings["plan_boxes"] = [[float(v) for v in p["bbox"]] for p in request.people]
    write_json_atomic(out_dir / "settings.json", settings)
    print(f"wrote {len(records)} image(s) and {out_dir / 'settings.json'}")
    return records
