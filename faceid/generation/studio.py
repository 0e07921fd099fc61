"""The web app without its UI: face analysis, the pipeline cache (the base SDXL loaded once, checkpoints swapped),
LoRAs and fast mode on the loaded pipeline, and one ``compare`` that turns uploads + options into images through
:func:`faceid.generation.request.generate` and writes each run's PNGs and ``settings.json``.

The pipeline loader is passed in (``load_pipeline(base_model, weights, device, dtype)``): this package never imports
the pipeline module; ``app.py`` gives the pipeline module's ``load_pipeline`` with the memory presets.

New options: give the option a name and a default in :data:`DEFAULT_OPTIONS` and map it to the request in
:func:`request_for` (``app.py`` adds its control).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from faceid.generation import defaults as D
from faceid.generation.faces import FaceCondition, FaceInputError, arrange, face_condition
from faceid.generation.loras import LoraError, load_loras, parse_lora_spec, unload_loras
from faceid.generation.request import GenerationRequest, generate
from faceid.generation.runs import BASE_LABEL, Weights, run_weights
from faceid.generation.styles import NO_STYLE, STYLES, apply_style

logger = logging.getLogger("app")

PROMPT = "analog film photo of a person in a cafe, smiling, 35mm photograph, film grain, highly detailed"
MAX_IMAGES = 4  # per click

DEFAULT_OPTIONS = {
    "prompt": PROMPT,
    "negative_prompt": D.NEGATIVE_PROMPT,
    "style": NO_STYLE,
    "steps": D.STEPS,
    "guidance_scale": D.GUIDANCE_SCALE,
    "controlnet_conditioning_scale": D.CONTROLNET_SCALE,
    "ip_adapter_scale": D.IP_ADAPTER_SCALE,
    "seed": D.SEED,
    "num_images": 1,
    "scheduler": "default",
    "fast": False,
    "enhance_face_region": False,
    "inpaint_strength": D.INPAINT_STRENGTH,
    "face_detail": False,
    "lora": "",
}


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


def request_for(cond: FaceCondition, o: dict, inpaint_size: int = D.INPAINT_SIZE) -> GenerationRequest:
    """The generation request for the uploads' :class:`FaceCondition` and checked options ``o``."""
    prompt, negative = apply_style(o["style"], o["prompt"], o["negative_prompt"])
    people = [{"embeds": p["embeddings"], "bbox": p["bbox"], "kps": p["kps"]} for p in cond.people]
    enhance = o.get("enhance_face_region") and cond.mode == "single" and cond.bbox is not None
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        embeds=cond.embeddings,
        kps=cond.kps,
        size=tuple(cond.size),
        steps=int(o["steps"]),
        guidance_scale=float(o["guidance_scale"]),
        controlnet_conditioning_scale=float(o["controlnet_conditioning_scale"]),
        ip_adapter_scale=float(o["ip_adapter_scale"]),
        scheduler="lcm" if o["fast"] else o["scheduler"],
        seed=int(o["seed"]),
        num_images=int(o["num_images"]),
        face_bbox=cond.bbox,
        control_mask=cond.face_mask() if enhance else None,
        target=cond.target,
        inpaint_strength=float(o["inpaint_strength"]),
        inpaint_size=int(inpaint_size),
        people=people if cond.mode == "people" else [],
        face_detail=bool(o["face_detail"]),
    )


def _option_notes(cond: FaceCondition, o: dict) -> list[str]:
    notes = []
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
    return notes


class Studio:
    """Face analysis, the pipeline cache and the one compare/generate function for the app."""

    def __init__(self, args, load_pipeline_fn):
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
        return self._load_pipeline_fn(self.args.base_model, weights, self.device, self.dtype)

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
            why = (
                str(exc)
                if isinstance(exc, LoraError)
                else f"LoRA {spec} not loaded ({type(exc).__name__}: {exc})"
            )
            raise FaceInputError(why) from exc
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
        from dataclasses import replace

        o = check_options(options)
        if not weights:
            raise FaceInputError("choose at least one checkpoint to compare")
        count = o["num_images"] if images_per_weights is None else images_per_weights
        request = replace(request_for(cond, o, self.args.inpaint_size), num_images=count)
        per_image = request.steps_per_image()
        total = count * per_image * len(weights)
        done, notes, results, per_weights = [0], list(cond.notes) + _option_notes(cond, o), [], []
        t0 = time.time()
        for w in weights:
            if progress:
                progress(done[0], total, f"loading {w.label}")
            with self.cache.use(w) as pipe:
                self._set_lora(pipe, o["lora"])
                note = self._set_fast(pipe, o["fast"])
                if note and note not in notes:
                    notes.append(note)
                ran, start = [0], [done[0]]

                def on_image(k, seed, _ran=ran, _start=start):
                    _ran[0], _start[0] = 0, done[0] + k * per_image

                def on_step(pipe_, i, t, tensors, _label=w.label, _ran=ran, _start=start):
                    _ran[0] += 1
                    if progress:
                        k = min(_ran[0], per_image)
                        progress(_start[0] + k, total, f"{_label}: step {k}/{per_image}")
                    return tensors

                images = generate(pipe, request, on_image=on_image, callback_on_step_end=on_step)
                done[0] += per_image * len(images)
                results += [(w, seed, image) for seed, image in zip(request.seeds(), images)]
            per_weights.append({"label": w.label, "face_adapter": w.face_adapter, "controlnet": w.controlnet})
        settings = self._settings(cond, o, request, per_weights, notes, time.time() - t0)
        settings["images"] = self._save(results, settings)
        if images_per_weights is None:
            return [im for _, _, im in results], settings
        return [(w.label, im) for w, _, im in results], settings

    def _settings(self, cond, o, request, per_weights, notes, seconds) -> dict:
        return {
            **{k: o[k] for k in DEFAULT_OPTIONS},
            "styled_prompt": request.prompt,
            "styled_negative_prompt": request.negative_prompt,
            "scheduler_used": request.scheduler,
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
            "face_detail_strength": request.face_detail_strength if request.detail else None,
            "offload": getattr(self.args, "offload", "none"),
            "vae_slicing": bool(getattr(self.args, "vae_slicing", False)),
            "vae_tiling": bool(getattr(self.args, "vae_tiling", False)),
            "base_model": str(self.args.base_model),
            "weights": per_weights,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "seconds": round(seconds, 2),
            "loads": {**self.cache.stats(), "lora_loads": self.lora_loads},
            "notes": notes,
        }

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
