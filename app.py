"""Web app (Gradio) for InstantID: generate from photos of a person, and compare the checkpoints of a training run.

    python app.py                                   # real weights (paths below), http://127.0.0.1:7860
    python app.py --tiny tiny                       # fully offline on tiny weights (built if missing)
    python app.py --run_dir runs/crossfaceid        # + the "Compare checkpoints" tab for that run
    python app.py --server_name 0.0.0.0 --server_port 8080   # on a server (--share for a public gradio link)

Generation: one or several photos of the person (one embedding each, averaged by the pipeline) and/or a face-info
file (``get_face_info.py``), an optional pose photo (keypoints and output size from its largest face), prompt,
negative prompt and a style preset, steps, guidance, IdentityNet and adapter strengths, seed, scheduler, fast mode
(LCM scheduler, with the LCM-LoRA when the file exists) and "enhance non-face region" (IdentityNet and the face
tokens act only on the face box). Each run's PNGs (settings in their ``parameters`` text chunk) and
``settings.json`` are written to ``OUTPUT_DIR/<time>/``.

Inference options: a **target photo** (the person is inpainted into its largest face with a feathered mask,
every pixel outside is the target's, output size = the target's); a **second and third person** (each with their
own embedding, keypoints and region: the largest faces of the pose photo, largest first, or side by side); a
**face detail** pass (the face regenerated larger and pasted back); a **LoRA** (``PATH[:SCALE]``, loaded once per
spec into the loaded pipeline, unloaded when cleared); memory presets ``--offload model|sequential``,
``--vae_slicing``, ``--vae_tiling`` applied at load.

Comparison: the same face, prompt and seed with the base weights and any ``checkpoint-N`` (and the final export)
of ``--run_dir``, side by side. The base SDXL is loaded once; a switch replaces only IdentityNet and the adapter
(:class:`faceid.generation.cache.PipelineCache`).

New pipeline options: give the option a name and a default in ``DEFAULT_OPTIONS``, add its control to
:func:`build_ui` (``option_inputs`` and the same-named parameter of ``run``/``compare``, which is also its
gradio_client name) and map it to pipeline arguments in :func:`call_kwargs` (and :func:`render` when it needs
another call). :meth:`Studio.generate` / :meth:`Studio.compare` take that ``options`` dict; nothing else changes.
Uploads (no initial value) go to ``extra_uploads`` and the ``=None`` parameters at the end, so that they stay
optional for gradio_client.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

from faceid.generation.faces import FaceCondition, FaceInputError, arrange, face_condition
from faceid.generation.runs import BASE_LABEL, Weights, run_weights
from faceid.generation.styles import NO_STYLE, STYLES, apply_style

# ---- defaults: edit these ----------------------------------------------------------------------
BASE_MODEL_PATH = "stabilityai/stable-diffusion-xl-base-1.0"
FACE_ADAPTER = "checkpoints/ip-adapter.bin"
CONTROLNET_PATH = "checkpoints/ControlNetModel"
FACE_ROOT = "."  # holds models/antelopev2
LCM_LORA = "checkpoints/lcm-lora-sdxl/pytorch_lora_weights.safetensors"  # fast mode uses it when present
RUN_DIR = None  # a training run's --output_dir, for the comparison tab
OUTPUT_DIR = "outputs/app"
SERVER_NAME = "127.0.0.1"  # localhost only; 0.0.0.0 to serve the network
SERVER_PORT = 7860
PROMPT = "analog film photo of a person in a cafe, smiling, 35mm photograph, film grain, highly detailed"
NEGATIVE_PROMPT = (
    "(lowres, low quality, worst quality:1.2), (text:1.2), watermark, painting, drawing, illustration, "
    "glitch, deformed, mutated, cross-eyed, ugly, disfigured"
)
SEED = 42
STEPS = 30
GUIDANCE_SCALE = 5.0
IP_ADAPTER_SCALE = 0.8
CONTROLNET_SCALE = 0.8
FAST_STEPS = 5  # what fast mode sets the sliders to (LCM wants few steps and low guidance)
FAST_GUIDANCE = 1.5
MAX_IMAGES = 4  # per click
MIN_SIDE, MAX_SIDE = 1024, 1280  # output size from the pose (or face) photo, like the official demo
MAX_PIXELS = 40_000_000  # uploads over this many pixels are refused before decoding
MAX_FILE_SIZE = "30mb"
MAX_CONTROLNETS = 2  # IdentityNets kept in memory while comparing
INPAINT_SIZE = 1024  # target photo / face detail: generation size of the face crop (longer side)
INPAINT_STRENGTH = 0.85  # target photo: share of the schedule that runs on the face crop
FACE_DETAIL_STRENGTH = 0.45  # face detail: low, so the composition stays
REGION_SCALE = 2.0  # several people: each person's region is their face box grown this much
# ------------------------------------------------------------------------------------------------

logger = logging.getLogger("app")

DEFAULT_OPTIONS = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE_PROMPT,
    "style": NO_STYLE,
    "steps": STEPS,
    "guidance_scale": GUIDANCE_SCALE,
    "controlnet_conditioning_scale": CONTROLNET_SCALE,
    "ip_adapter_scale": IP_ADAPTER_SCALE,
    "seed": SEED,
    "num_images": 1,
    "scheduler": "default",
    "fast": False,
    "enhance_face_region": False,
    "inpaint_strength": INPAINT_STRENGTH,
    "face_detail": False,
    "lora": "",
}


def parse_args(argv=None):
    from infer_from_pkl import SCHEDULERS
    from pipeline_stable_diffusion_xl_instantid import OFFLOAD_CHOICES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_model", default=BASE_MODEL_PATH, help="SDXL diffusers folder or hub id")
    p.add_argument("--face_adapter", default=FACE_ADAPTER, help="base ip-adapter.bin / .safetensors")
    p.add_argument("--controlnet", default=CONTROLNET_PATH, help="base IdentityNet folder (ControlNetModel)")
    p.add_argument("--face_root", default=FACE_ROOT, help="folder holding models/antelopev2")
    p.add_argument("--lcm_lora", default=LCM_LORA, help="LCM-LoRA for fast mode (used when the file exists)")
    p.add_argument("--run_dir", default=RUN_DIR, help="training run folder to compare its checkpoint-N/")
    p.add_argument("--output_dir", default=OUTPUT_DIR, help="where each run's PNGs and settings.json go")
    p.add_argument(
        "--tiny", default=None, metavar="DIR", help="tiny offline weights in DIR (built if missing)"
    )
    p.add_argument("--server_name", default=SERVER_NAME)
    p.add_argument("--server_port", type=int, default=SERVER_PORT)
    p.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (off by default)"
    )
    p.add_argument("--steps", type=int, default=STEPS, help="default of the steps slider")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="default", help="default scheduler")
    p.add_argument("--min_side", type=int, default=MIN_SIDE)
    p.add_argument("--max_side", type=int, default=MAX_SIDE)
    p.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="largest upload, in pixels")
    p.add_argument("--max_controlnets", type=int, default=MAX_CONTROLNETS)
    p.add_argument(
        "--inpaint_size", type=int, default=INPAINT_SIZE, help="target photo / face detail crop size"
    )
    p.add_argument(
        "--offload", choices=OFFLOAD_CHOICES, default="none", help="small GPUs: CPU offload preset"
    )
    p.add_argument("--vae_slicing", action="store_true", help="decode one image of a batch at a time")
    p.add_argument("--vae_tiling", action="store_true", help="decode large images in tiles")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    return p.parse_args(argv)


def apply_tiny(args) -> list[str]:
    """Point the paths left at their defaults into the tiny build, use its sizes; return example face photos."""
    from faceid.tiny.faces import write_synthetic_face
    from faceid.tiny.models import point_defaults_at_tiny

    point_defaults_at_tiny(
        args,
        {
            "base_model": BASE_MODEL_PATH,
            "controlnet": CONTROLNET_PATH,
            "face_adapter": FACE_ADAPTER,
            "face_root": FACE_ROOT,
        },
    )
    if args.lcm_lora == LCM_LORA:
        args.lcm_lora = str(Path(args.tiny) / "checkpoints" / "lcm-lora" / "pytorch_lora_weights.safetensors")
    if (args.min_side, args.max_side) == (MIN_SIDE, MAX_SIDE):
        args.min_side = args.max_side = 64
    if args.steps == STEPS:
        args.steps = 4
    if args.inpaint_size == INPAINT_SIZE:
        args.inpaint_size = 64
    examples = Path(args.tiny) / "examples"
    return [str(write_synthetic_face(examples / f"face{i}.png", seed=i)) for i in range(2)]


def call_kwargs(cond: FaceCondition, o: dict) -> dict:
    """Pipeline arguments for the face and the options (everything but the generator and the callback).
    With a target photo they are :func:`face_inpaint`'s (no keypoint image or size: it makes its own crop);
    with several people the ``faces=`` of :func:`people_inputs`."""
    prompt, negative = apply_style(o["style"], o["prompt"], o["negative_prompt"])
    kwargs = dict(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=int(o["steps"]),
        guidance_scale=float(o["guidance_scale"]),
        controlnet_conditioning_scale=float(o["controlnet_conditioning_scale"]),
        ip_adapter_scale=float(o["ip_adapter_scale"]),
    )
    if cond.mode == "inpaint":
        return dict(kwargs, image_embeds=cond.embeddings)
    kwargs.update(width=cond.size[0], height=cond.size[1])
    if cond.mode == "people":
        from pipeline_stable_diffusion_xl_instantid import people_inputs

        kps = None if cond.people[0]["kps"] is None else [p["kps"] for p in cond.people]
        kwargs["faces"] = people_inputs(
            [p["embeddings"] for p in cond.people],
            cond.size,
            [p["bbox"] for p in cond.people],
            kps=kps,
            region_scale=REGION_SCALE,
        )
        return kwargs
    kwargs.update(image_embeds=cond.embeddings, image=cond.kps_image)
    if o.get("enhance_face_region") and cond.bbox is not None:
        kwargs["control_mask"] = cond.face_mask()
    return kwargs


def render(pipe, cond: FaceCondition, o: dict, kwargs: dict, inpaint_size: int, **extra):
    """One image: the pipeline call for ``kwargs`` (:func:`call_kwargs`), through :func:`face_inpaint` with a
    target photo, followed by :func:`face_detail` when asked (one person, no target)."""
    from pipeline_stable_diffusion_xl_instantid import face_detail, face_inpaint

    if cond.mode == "inpaint":
        rest = {k: v for k, v in kwargs.items() if k not in ("prompt", "image_embeds")}
        return face_inpaint(
            pipe,
            cond.target,
            kwargs["image_embeds"],
            kwargs["prompt"],
            bbox=cond.bbox,
            kps=cond.kps,
            size=inpaint_size,
            strength=float(o["inpaint_strength"]),
            **rest,
            **extra,
        )
    image = pipe(**kwargs, **extra).images[0]
    if o["face_detail"] and cond.mode == "single":
        from faceid.face.regions import bbox_from_kps

        skip = ("prompt", "image_embeds", "image", "width", "height", "control_mask")
        rest = {k: v for k, v in kwargs.items() if k not in skip}
        image = face_detail(
            pipe,
            image,
            cond.embeddings,
            kwargs["prompt"],
            bbox=cond.bbox if cond.bbox is not None else bbox_from_kps(cond.kps),
            kps=cond.kps,
            size=inpaint_size,
            strength=FACE_DETAIL_STRENGTH,
            **rest,
            **extra,
        )
    return image


def steps_per_image(cond: FaceCondition, o: dict) -> int:
    """Denoising steps one image takes (for the progress bar): strength shortens the schedule."""
    steps = int(o["steps"])
    if cond.mode == "inpaint":
        return max(1, int(steps * float(o["inpaint_strength"])))
    if o["face_detail"] and cond.mode == "single":
        return steps + max(1, int(steps * FACE_DETAIL_STRENGTH))
    return steps


def check_options(options: dict) -> dict:
    """Defaults filled in and ranges checked (a :class:`FaceInputError`-style message, never a traceback)."""
    o = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    if o["style"] not in STYLES:
        raise FaceInputError(f"unknown style {o['style']!r}")
    for key, lo, hi in (("steps", 1, 150), ("num_images", 1, MAX_IMAGES)):
        if not lo <= int(o[key]) <= hi:
            raise FaceInputError(f"{key} must be between {lo} and {hi}, got {o[key]}")
        o[key] = int(o[key])
    o["seed"] = int(o["seed"])
    o["inpaint_strength"] = float(o["inpaint_strength"])
    if not 0 < o["inpaint_strength"] <= 1:
        raise FaceInputError(f"target photo strength must be in (0, 1], got {o['inpaint_strength']}")
    o["face_detail"] = bool(o["face_detail"])
    o["lora"] = str(o["lora"] or "").strip()
    if o["seed"] < 0:
        o["seed"] = random.randint(0, 2**31 - 1)
    return o


class Studio:
    """The app without its UI: face analysis, the pipeline cache, the one generate function."""

    def __init__(self, args, load_pipeline_fn=None):
        from faceid.generation.cache import PipelineCache
        from faceid.runtime import pick_device_dtype

        self.args = args
        self.device, self.dtype = pick_device_dtype(args.device, args.dtype)
        self._load_pipeline_fn = load_pipeline_fn
        self.base = Weights(BASE_LABEL, str(args.face_adapter), str(args.controlnet))
        self.cache = PipelineCache(self._load_pipeline, self._load_controlnet, args.max_controlnets)
        self._analyzer = None
        self.lcm = None  # None: not tried yet; True: LoRA loaded; str: why fast mode runs without it
        self.lora = ""  # the LoRA spec loaded into the pipeline ("" none)
        self.lora_loads = 0

    # ---- loading --------------------------------------------------------------------------------
    def _load_pipeline(self, weights: Weights):
        from pipeline_stable_diffusion_xl_instantid import apply_memory_options, load_pipeline

        if self._load_pipeline_fn is not None:
            pipe = self._load_pipeline_fn(self.args.base_model, weights, self.device, self.dtype)
        else:
            pipe = load_pipeline(
                self.args.base_model,
                weights.controlnet,
                weights.face_adapter,
                device=self.device,
                dtype=self.dtype,
                progress=False,
            )
        offload = getattr(self.args, "offload", "none")
        return apply_memory_options(
            pipe,
            offload=offload,
            vae_slicing=getattr(self.args, "vae_slicing", False),
            vae_tiling=getattr(self.args, "vae_tiling", False),
            device=self.device if offload != "none" else None,
        )

    def _load_controlnet(self, path: str):
        from diffusers import ControlNetModel

        from faceid.runtime import dtype_kwargs

        return ControlNetModel.from_pretrained(path, **dtype_kwargs(self.dtype)).to(self.device)

    def analyzer(self):
        if self._analyzer is None:
            from faceid.face.analysis import FaceAnalyzer, NoFaceModelError

            try:
                self._analyzer = FaceAnalyzer(self.args.face_root)
            except NoFaceModelError as exc:
                raise FaceInputError(str(exc)) from exc
        return self._analyzer

    def weights_choices(self) -> list[Weights]:
        return run_weights(self.args.run_dir, self.base)

    def condition(self, face_files=None, face_info=None, pose=None, target=None, people=()) -> FaceCondition:
        """The face from the uploads; ``target``: a photo to inpaint the person into; ``people``: the photos
        of person 2, 3, ... (:func:`faceid.generation.faces.arrange`)."""
        cond = face_condition(
            face_files,
            face_info,
            pose,
            analyzer=self.analyzer,
            min_side=self.args.min_side,
            max_side=self.args.max_side,
            max_pixels=self.args.max_pixels,
        )
        return arrange(
            cond,
            target=target,
            people_files=people or (),
            pose=pose,
            analyzer=self.analyzer,
            max_pixels=self.args.max_pixels,
        )

    # ---- LoRA ----------------------------------------------------------------------------------
    def _set_lora(self, pipe, spec: str) -> None:
        """The LoRA ``PATH[:SCALE]`` loaded into the pipeline (once per spec; "" unloads it). The base stays."""
        spec = (spec or "").strip()
        if spec == self.lora:
            return
        from pipeline_stable_diffusion_xl_instantid import load_loras, parse_lora_spec, unload_loras

        if self.lora:
            unload_loras(pipe)  # every LoRA: the LCM-LoRA too, reloaded when fast mode next needs it
            self.lora = ""
            if self.lcm is True:
                self.lcm = None
        if not spec:
            return
        path = parse_lora_spec(spec)[0]
        if not Path(path).exists():
            raise FaceInputError(
                f"LoRA not found: {path} (give PATH[:SCALE] of a .safetensors file or folder)"
            )
        try:
            load_loras(pipe, [spec])
        except Exception as exc:  # peft missing, a LoRA for another model, a broken file
            try:
                unload_loras(pipe)
            except Exception:
                logger.exception("unloading after a failed LoRA load")
            if self.lcm is True:
                self.lcm = None
            raise FaceInputError(f"LoRA {spec} not loaded ({type(exc).__name__}: {exc})") from exc
        self.lora = spec
        self.lora_loads += 1

    # ---- fast mode -----------------------------------------------------------------------------
    def _set_fast(self, pipe, fast: bool) -> str | None:
        """LCM-LoRA on for fast mode, off otherwise; returns a note when fast mode runs without it."""
        if fast and self.lcm is None:
            path = self.args.lcm_lora
            if not path or not Path(path).is_file():
                self.lcm = f"no LCM-LoRA at {path}: fast mode uses the LCM scheduler alone"
            else:
                try:
                    pipe.load_lora_weights(path, adapter_name="lcm")
                    self.lcm = True
                except Exception as exc:  # peft missing, or a LoRA for another model
                    self.lcm = f"LCM-LoRA {path} not loaded ({type(exc).__name__}: {exc})"
        if self.lora:  # the user's LoRA always, the LCM-LoRA in fast mode
            from pipeline_stable_diffusion_xl_instantid import parse_lora_spec

            names, scales = ["lora0"], [parse_lora_spec(self.lora)[1]]
            if fast and self.lcm is True:
                names, scales = names + ["lcm"], scales + [1.0]
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=scales)
        elif self.lcm is True:  # the only adapter (a user LoRA's unload removes it too)
            (pipe.enable_lora if fast else pipe.disable_lora)()
        return self.lcm if fast and self.lcm is not True else None

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, cond: FaceCondition, options: dict, weights: Weights | None = None, progress=None):
        """Images for ``cond`` with ``options`` (see DEFAULT_OPTIONS) and ``weights`` (default: the base);
        ``progress(done, total, desc)`` after each step. Returns ``(images, settings)``."""
        return self.compare(cond, options, [weights or self.base], progress, images_per_weights=None)

    def compare(
        self, cond, options, weights: list[Weights], progress=None, images_per_weights: int | None = 1
    ):
        """The same face, prompt and seed with each of ``weights`` → ``([(label, image)...], settings)``
        (:meth:`generate` returns bare images)."""
        import torch

        from infer_from_pkl import set_scheduler

        o = check_options(options)
        if not weights:
            raise FaceInputError("choose at least one checkpoint to compare")
        count = o["num_images"] if images_per_weights is None else images_per_weights
        per_image = steps_per_image(cond, o)
        total = count * per_image * len(weights)
        kwargs = call_kwargs(cond, o)
        done, notes, results, per_weights = 0, list(cond.notes), [], []
        if o.get("enhance_face_region"):
            if cond.mode != "single":
                notes.append(
                    "enhance non-face region is not used with a target photo or several people (the face "
                    "region already limits the face)"
                )
            elif cond.bbox is None:
                notes.append("enhance non-face region needs a face box: the face-info file has none")
        if o["face_detail"] and cond.mode != "single":
            notes.append(
                "face detail is not used with "
                + (
                    "a target photo (its face is generated at the detail size already)"
                    if cond.mode == "inpaint"
                    else "several people"
                )
            )
        t0 = time.time()
        for w in weights:
            if progress:
                progress(done, total, f"loading {w.label}")
            with self.cache.use(w) as pipe:
                scheduler = "lcm" if o["fast"] else o["scheduler"]
                set_scheduler(pipe, scheduler)
                self._set_lora(pipe, o["lora"])
                note = self._set_fast(pipe, o["fast"])
                if note and note not in notes:
                    notes.append(note)
                for n in range(count):
                    seed = o["seed"] + n
                    ran = [0]

                    def on_step(pipe_, i, t, tensors, _base=done, _label=w.label, _ran=ran):
                        _ran[0] += 1
                        if progress:
                            k = min(_ran[0], per_image)
                            progress(_base + k, total, f"{_label}: step {k}/{per_image}")
                        return tensors

                    image = render(
                        pipe,
                        cond,
                        o,
                        kwargs,
                        self.args.inpaint_size,
                        generator=torch.Generator(device="cpu").manual_seed(seed),
                        callback_on_step_end=on_step,
                    )
                    done += per_image
                    results.append((w, seed, image))
            per_weights.append({"label": w.label, "face_adapter": w.face_adapter, "controlnet": w.controlnet})
        settings = {
            **{k: o[k] for k in DEFAULT_OPTIONS},
            "styled_prompt": kwargs["prompt"],
            "styled_negative_prompt": kwargs["negative_prompt"],
            "scheduler_used": "lcm" if o["fast"] else o["scheduler"],
            "lcm_lora": bool(o["fast"] and self.lcm is True),
            "width": cond.size[0],
            "height": cond.size[1],
            "references": cond.sources,
            "pose_from": cond.pose_source,
            "mode": cond.mode,
            "target": cond.target_source or None,
            "target_face_bbox": [round(float(v), 1) for v in cond.bbox] if cond.mode == "inpaint" else None,
            "people": [
                {"references": p["source"], "bbox": [round(float(v), 1) for v in p["bbox"]]}
                for p in cond.people
            ],
            "lora_loaded": self.lora or None,
            "inpaint_size": int(self.args.inpaint_size),
            "face_detail_strength": FACE_DETAIL_STRENGTH
            if o["face_detail"] and cond.mode == "single"
            else None,
            "offload": getattr(self.args, "offload", "none"),
            "vae_slicing": bool(getattr(self.args, "vae_slicing", False)),
            "vae_tiling": bool(getattr(self.args, "vae_tiling", False)),
            "base_model": str(self.args.base_model),
            "weights": per_weights,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "seconds": round(time.time() - t0, 2),
            "loads": {**self.cache.stats(), "lora_loads": self.lora_loads},
            "notes": notes,
        }
        settings["images"] = self._save(results, settings)
        if images_per_weights is None:
            return [im for _, _, im in results], settings
        return [(w.label, im) for w, _, im in results], settings

    def _save(self, results, settings) -> list[dict]:
        """Write the PNGs (settings in a ``parameters`` text chunk) and settings.json; the gallery serves these."""
        from PIL.PngImagePlugin import PngInfo

        from faceid.files import atomic_path, write_json_atomic

        out = Path(self.args.output_dir) / time.strftime("%Y%m%d-%H%M%S")
        k = 1
        while out.exists():
            out = out.with_name(f"{out.name.split('_')[0]}_{k}")
            k += 1
        out.mkdir(parents=True)
        records = []
        for w, seed, image in results:
            path = out / f"{w.label}_{seed}.png"
            info = PngInfo()
            info.add_text("parameters", json.dumps({**settings, "weights": w.label, "seed": seed}))
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
            records.append({"file": path.name, "weights": w.label, "seed": seed})
        settings["output_dir"] = str(out.resolve())
        write_json_atomic(out / "settings.json", {**settings, "images": records})
        return records


# ---- UI -----------------------------------------------------------------------------------------
def _status(message: str, ok: bool) -> str:
    head = "**Done.**" if ok else "**Cannot generate:**"
    return f"{head} {message}".strip()


def _notes_text(settings: dict) -> str:
    base = f"{len(settings['images'])} image(s), {settings['width']}x{settings['height']}, seed {settings['seed']}"
    base += f", {settings['seconds']} s."
    return base + "".join(f"\n\n⚠ {n}" for n in settings["notes"])


def build_ui(studio: Studio, examples: list[str] | None = None):
    import gradio as gr

    from infer_from_pkl import SCHEDULERS

    args = studio.args
    choices = [w.label for w in studio.weights_choices()]
    with gr.Blocks(title="InstantID", analytics_enabled=False) as demo:
        gr.Markdown(
            "# InstantID\nUpload one or several photos of a person (or a face-info file), optionally a pose "
            "photo, and describe the picture."
        )
        with gr.Row():
            with gr.Column(scale=1):

                def upload(label, elem_id, height=110, **kw):
                    return gr.File(label=label, height=height, elem_id=elem_id, **kw)

                face_files = upload(
                    "Photos of the person (one or several)", "face-files", 150, file_count="multiple"
                )
                with gr.Row():
                    face_info = upload("…or a face-info file (.pkl / .npz)", "face-info", 130)
                    pose = upload("Pose photo (optional)", "pose", 130)
                with gr.Accordion("Target photo, several people", open=False):
                    target = upload("Target photo (optional): the person replaces its largest face", "target")
                    with gr.Row():
                        person2 = upload("Second person's photo (optional)", "person2")
                        person3 = upload("Third person's photo (optional)", "person3")
                prompt = gr.Textbox(label="Prompt", value=PROMPT, lines=2, elem_id="prompt")
                style = gr.Dropdown(list(STYLES), value=NO_STYLE, label="Style")
                negative = gr.Textbox(label="Negative prompt", value=NEGATIVE_PROMPT, lines=2)
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=args.steps, step=1, label="Steps")
                        guidance = gr.Slider(0, 20, value=GUIDANCE_SCALE, step=0.1, label="Guidance")
                    with gr.Row():
                        cn_scale = gr.Slider(
                            0, 1.5, value=CONTROLNET_SCALE, step=0.05, label="IdentityNet strength"
                        )
                        ip_scale = gr.Slider(
                            0, 1.5, value=IP_ADAPTER_SCALE, step=0.05, label="Adapter strength"
                        )
                    with gr.Row():
                        seed = gr.Number(value=SEED, precision=0, label="Seed (-1: random)")
                        num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                    with gr.Row():
                        scheduler = gr.Dropdown(list(SCHEDULERS), value=args.scheduler, label="Scheduler")
                        fast = gr.Checkbox(value=False, label="Fast mode (LCM)")
                        enhance = gr.Checkbox(value=False, label="Enhance non-face region")
                    with gr.Row():
                        inpaint_strength = gr.Slider(
                            0.05, 1, value=INPAINT_STRENGTH, step=0.05, label="Target photo strength"
                        )
                        face_detail = gr.Checkbox(value=False, label="Face detail pass")
                    lora = gr.Textbox(label="LoRA (optional): PATH[:SCALE]", value="", elem_id="lora")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready.", label="Status", elem_id="status")
                with gr.Tabs():
                    with gr.Tab("Generate"):
                        run_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                        gallery = gr.Gallery(
                            label="Results",
                            columns=2,
                            height=360,
                            object_fit="contain",
                            format="png",
                            buttons=["download", "fullscreen"],
                            elem_id="gallery",
                        )
                    with gr.Tab("Compare checkpoints"):
                        gr.Markdown(
                            f"Run folder: `{args.run_dir or '(none: start with --run_dir)'}`. Same face, prompt and "
                            "seed with each checkpoint; the base SDXL stays loaded."
                        )
                        picked = gr.CheckboxGroup(
                            choices, value=choices[:2], label="Weights", elem_id="picked"
                        )
                        with gr.Row():
                            refresh_btn = gr.Button("Rescan run folder")
                            cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                        cmp_gallery = gr.Gallery(
                            label="Side by side",
                            columns=max(1, min(4, len(choices))),
                            height=360,
                            object_fit="contain",
                            format="png",
                            buttons=["download", "fullscreen"],
                            elem_id="compare-gallery",
                        )
                kps_view = gr.Image(label="Keypoints used", height=160, interactive=False)
                settings_view = gr.JSON(label="Settings used")
        if examples:
            gr.Examples([[[e]] for e in examples], inputs=[face_files], label="Example faces (tiny)")

        option_inputs = [prompt, negative, style, steps, guidance, cn_scale, ip_scale, seed, num_images]
        option_inputs += [scheduler, fast, enhance, inpaint_strength, face_detail, lora]
        extra_uploads = [target, person2, person3]

        def _bar(progress):
            return lambda done, total, desc: progress((done, total), desc=desc)

        def _failed(exc: Exception, gallery_value):
            if not isinstance(exc, FaceInputError):  # keep serving; the console has the traceback
                logger.exception("generation failed")
            text = str(exc) if isinstance(exc, FaceInputError) else f"{type(exc).__name__}: {exc}"
            return gallery_value, None, None, _status(text, False)

        # Named parameters: they are the API's names (gradio_client: predict(..., prompt=..., api_name=...)).
        # The new uploads come last with None defaults: optional for gradio_client (older calls keep working).
        def run(
            face_files, face_info, pose, prompt, negative_prompt, style, steps, guidance_scale,
            controlnet_conditioning_scale, ip_adapter_scale, seed, num_images, scheduler, fast,
            enhance_face_region, inpaint_strength, face_detail, lora, target=None, person2=None, person3=None,
            progress=gr.Progress(),
        ):  # fmt: skip
            options = {k: v for k, v in locals().items() if k in DEFAULT_OPTIONS}
            try:
                cond = studio.condition(face_files, face_info, pose, target, [person2, person3])
                _, settings = studio.generate(cond, options, progress=_bar(progress))
            except Exception as exc:
                return _failed(exc, [])
            paths = [str(Path(settings["output_dir"]) / r["file"]) for r in settings["images"]]
            return paths, cond.kps_image, settings, _status(_notes_text(settings), True)

        def compare(
            face_files, face_info, pose, weights, prompt, negative_prompt, style, steps, guidance_scale,
            controlnet_conditioning_scale, ip_adapter_scale, seed, num_images, scheduler, fast,
            enhance_face_region, inpaint_strength, face_detail, lora, target=None, person2=None, person3=None,
            progress=gr.Progress(),
        ):  # fmt: skip
            options = {k: v for k, v in locals().items() if k in DEFAULT_OPTIONS}
            try:
                by_label = {w.label: w for w in studio.weights_choices()}
                missing = [x for x in weights or [] if x not in by_label]
                if missing:
                    raise FaceInputError(f"{', '.join(missing)} no longer in the run folder: rescan")
                cond = studio.condition(face_files, face_info, pose, target, [person2, person3])
                chosen = [by_label[x] for x in weights or []]
                _, settings = studio.compare(cond, options, chosen, progress=_bar(progress))
            except Exception as exc:
                return _failed(exc, [])
            shown = [
                (str(Path(settings["output_dir"]) / r["file"]), r["weights"]) for r in settings["images"]
            ]
            return shown, cond.kps_image, settings, _status(_notes_text(settings), True)

        def rescan():
            labels = [w.label for w in studio.weights_choices()]
            return gr.CheckboxGroup(choices=labels)

        def on_fast(on: bool):
            return (FAST_STEPS, FAST_GUIDANCE) if on else (args.steps, GUIDANCE_SCALE)

        outputs = [kps_view, settings_view, status]
        run_btn.click(
            run,
            [face_files, face_info, pose, *option_inputs, *extra_uploads],
            [gallery, *outputs],
            api_name="generate",
            concurrency_id="pipeline",
            concurrency_limit=1,
        )
        cmp_btn.click(
            compare,
            [face_files, face_info, pose, picked, *option_inputs, *extra_uploads],
            [cmp_gallery, *outputs],
            api_name="compare",
            concurrency_id="pipeline",
            concurrency_limit=1,
        )
        refresh_btn.click(rescan, None, picked, api_name="rescan")
        fast.change(on_fast, fast, [steps, guidance], api_name=False)
    return demo


def main(args):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    examples = apply_tiny(args) if args.tiny else None
    for label, path in (("face adapter", args.face_adapter), ("IdentityNet", args.controlnet)):
        if not Path(path).exists():
            raise SystemExit(f"{label} not found: {path} (run `python download.py` or pass --tiny DIR)")
    if args.run_dir and not Path(args.run_dir).is_dir():
        raise SystemExit(f"--run_dir {args.run_dir}: not a folder")
    studio = Studio(args)
    t0 = time.time()
    studio.cache.get(studio.base)  # load before serving: a broken path fails here, not on the first click
    try:
        studio.analyzer()  # insightface is slow to import: not on the first click
    except FaceInputError as exc:
        print(f"warning: {exc}; only face-info files can be used", flush=True)
    print(f"loaded {args.base_model} on {studio.device} in {time.time() - t0:.1f}s", flush=True)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    demo = build_ui(studio, examples)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=args.server_name,
        server_port=args.server_port,
        share=args.share,
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(Path(args.output_dir).resolve())],
        ssr_mode=False,
        show_error=True,
        css="#status {min-height: 2.5em}",
    )
    return studio


if __name__ == "__main__":
    sys.exit(0 if main(parse_args()) is not None else 1)
