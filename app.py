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
own embedding, keypoints and region: the largest faces of the pose photo, left to right, or side by side); a
**face detail** pass (the face regenerated larger and pasted back); a **LoRA** (``PATH[:SCALE]``, loaded once per
spec into the loaded pipeline, unloaded when cleared); memory presets ``--offload model|sequential``,
``--vae_slicing``, ``--vae_tiling`` applied at load.

Comparison: the same face, prompt and seed with the base weights and any ``checkpoint-N`` (and the final export)
of ``--run_dir``, side by side. The base SDXL is loaded once; a switch replaces only IdentityNet and the adapter
(:class:`faceid.generation.cache.PipelineCache`).

The app's logic without the UI (face conditioning, the pipeline cache, LoRAs, fast mode, saving) is
:class:`faceid.generation.studio.Studio`; images come from the one generation path,
:func:`faceid.generation.request.generate`, as in ``infer_from_pkl.py``. New options: a name and a default in
``DEFAULT_OPTIONS`` and their mapping in ``request_for`` (``faceid/generation/studio.py``), their control in
:func:`build_ui` (in ``option_inputs``, same-named as the option: it is also its gradio_client name). Uploads (no
initial value) go to ``extra_uploads`` at the end, so that they stay optional for gradio_client.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import time
from pathlib import Path

from faceid.generation import defaults as D
from faceid.generation import studio as studio_logic
from faceid.generation.faces import FaceInputError
from faceid.generation.memory import OFFLOAD_CHOICES
from faceid.generation.schedulers import SCHEDULERS
from faceid.generation.studio import DEFAULT_OPTIONS, MAX_IMAGES, PROMPT
from faceid.generation.styles import NO_STYLE, STYLES

# ---- defaults: edit these (generation numbers: faceid/generation/defaults.py, shared with infer_from_pkl.py) ----
BASE_MODEL_PATH = "stabilityai/stable-diffusion-xl-base-1.0"
FACE_ADAPTER = "checkpoints/ip-adapter.bin"
CONTROLNET_PATH = "checkpoints/ControlNetModel"
FACE_ROOT = "."  # holds models/antelopev2
LCM_LORA = "checkpoints/lcm-lora-sdxl/pytorch_lora_weights.safetensors"  # fast mode uses it when present
RUN_DIR = None  # a training run's --output_dir, for the comparison tab
OUTPUT_DIR = "outputs/app"
SERVER_NAME = "127.0.0.1"  # localhost only; 0.0.0.0 to serve the network
SERVER_PORT = 7860
MAX_PIXELS = 40_000_000  # uploads over this many pixels are refused before decoding
MAX_FILE_SIZE = "30mb"
MAX_CONTROLNETS = 2  # IdentityNets kept in memory while comparing
# ------------------------------------------------------------------------------------------------

logger = logging.getLogger("app")


def parse_args(argv=None):
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
    p.add_argument("--steps", type=int, default=D.STEPS, help="default of the steps slider")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="default", help="default scheduler")
    p.add_argument("--min_side", type=int, default=D.MIN_SIDE)
    p.add_argument("--max_side", type=int, default=D.MAX_SIDE)
    p.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="largest upload, in pixels")
    p.add_argument("--max_controlnets", type=int, default=MAX_CONTROLNETS)
    p.add_argument(
        "--inpaint_size", type=int, default=D.INPAINT_SIZE, help="target photo / face detail crop size"
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

    paths = dict(base_model=BASE_MODEL_PATH, controlnet=CONTROLNET_PATH, face_adapter=FACE_ADAPTER)
    point_defaults_at_tiny(args, dict(paths, face_root=FACE_ROOT))
    if args.lcm_lora == LCM_LORA:
        args.lcm_lora = str(Path(args.tiny) / "checkpoints" / "lcm-lora" / "pytorch_lora_weights.safetensors")
    D.shrink_for_tiny(args)
    examples = Path(args.tiny) / "examples"
    return [str(write_synthetic_face(examples / f"face{i}.png", seed=i)) for i in range(2)]


def load_for_app(args):
    """The app's pipeline loader: the pipeline module's :func:`load_pipeline` with the memory presets of ``args``."""

    def load(base_model, weights, device, dtype):
        from pipeline_stable_diffusion_xl_instantid import load_pipeline

        return load_pipeline(
            base_model,
            weights.controlnet,
            weights.face_adapter,
            device=device,
            dtype=dtype,
            progress=False,
            offload=getattr(args, "offload", "none"),
            vae_slicing=getattr(args, "vae_slicing", False),
            vae_tiling=getattr(args, "vae_tiling", False),
        )

    return load


class Studio(studio_logic.Studio):
    """:class:`faceid.generation.studio.Studio` loading with :func:`load_for_app` unless given another loader."""

    def __init__(self, args, load_pipeline_fn=None):
        super().__init__(args, load_pipeline_fn or load_for_app(args))


# ---- UI -----------------------------------------------------------------------------------------
def _status(message: str, ok: bool) -> str:
    head = "**Done.**" if ok else "**Cannot generate:**"
    return f"{head} {message}".strip()


def _notes_text(settings: dict) -> str:
    base = f"{len(settings['images'])} image(s), {settings['width']}x{settings['height']}, seed {settings['seed']}"
    base += f", {settings['seconds']} s."
    return base + "".join(f"\n\n⚠ {n}" for n in settings["notes"])


UPLOADS = ("face_files", "face_info", "pose")  # first inputs of both buttons
# Last, with None defaults: optional for gradio_client (older calls keep working).
EXTRA_UPLOADS = ("target", "person2", "person3")


def _handler(studio: Studio, bar, failed, compare: bool):
    """The click handler of Generate (``compare=False``) or Compare: one function for both. Its parameters are
    the API's names (gradio_client: ``predict(..., prompt=..., api_name="generate")``), so its signature is
    written out: the uploads, ``weights`` (Compare only), the options, the extra uploads, ``progress``."""
    import gradio as gr

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    names = [*UPLOADS, *(["weights"] if compare else []), *DEFAULT_OPTIONS]
    params = [inspect.Parameter(n, kind) for n in names]
    params += [inspect.Parameter(n, kind, default=None) for n in EXTRA_UPLOADS]
    params.append(inspect.Parameter("progress", kind, default=gr.Progress()))
    signature = inspect.Signature(params)

    def handle(*args, **kwargs):
        a = signature.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        options = {k: a[k] for k in DEFAULT_OPTIONS}
        try:
            cond = studio.condition(
                a["face_files"], a["face_info"], a["pose"], a["target"], [a["person2"], a["person3"]]
            )
            if not compare:
                _, settings = studio.generate(cond, options, progress=bar(a["progress"]))
                shown = [str(Path(settings["output_dir"]) / r["file"]) for r in settings["images"]]
            else:
                by_label = {w.label: w for w in studio.weights_choices()}
                missing = [x for x in a["weights"] or [] if x not in by_label]
                if missing:
                    raise FaceInputError(f"{', '.join(missing)} no longer in the run folder: rescan")
                chosen = [by_label[x] for x in a["weights"] or []]
                _, settings = studio.compare(cond, options, chosen, progress=bar(a["progress"]))
                out = Path(settings["output_dir"])
                shown = [(str(out / r["file"]), r["weights"]) for r in settings["images"]]
        except Exception as exc:
            return failed(exc, [])
        return shown, cond.kps_image, settings, _status(_notes_text(settings), True)

    handle.__signature__ = signature
    handle.__name__ = "compare" if compare else "run"
    return handle


def build_ui(studio: Studio, examples: list[str] | None = None):
    import gradio as gr

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
                negative = gr.Textbox(label="Negative prompt", value=D.NEGATIVE_PROMPT, lines=2)
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=args.steps, step=1, label="Steps")
                        guidance = gr.Slider(0, 20, value=D.GUIDANCE_SCALE, step=0.1, label="Guidance")
                    with gr.Row():
                        cn_scale = gr.Slider(
                            0, 1.5, value=D.CONTROLNET_SCALE, step=0.05, label="IdentityNet strength"
                        )
                        ip_scale = gr.Slider(
                            0, 1.5, value=D.IP_ADAPTER_SCALE, step=0.05, label="Adapter strength"
                        )
                    with gr.Row():
                        seed = gr.Number(value=D.SEED, precision=0, label="Seed (-1: random)")
                        num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                    with gr.Row():
                        scheduler = gr.Dropdown(list(SCHEDULERS), value=args.scheduler, label="Scheduler")
                        fast = gr.Checkbox(value=False, label="Fast mode (LCM)")
                        enhance = gr.Checkbox(value=False, label="Enhance non-face region")
                    with gr.Row():
                        inpaint_strength = gr.Slider(
                            0.05, 1, value=D.INPAINT_STRENGTH, step=0.05, label="Target photo strength"
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

        run = _handler(studio, _bar, _failed, compare=False)
        compare = _handler(studio, _bar, _failed, compare=True)

        def rescan():
            labels = [w.label for w in studio.weights_choices()]
            return gr.CheckboxGroup(choices=labels)

        def on_fast(on: bool):
            return (D.LCM_STEPS, D.LCM_GUIDANCE) if on else (args.steps, D.GUIDANCE_SCALE)

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
    try:
        D.check_weights(args.face_adapter, args.controlnet)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from exc
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
    from faceid import cli

    cli.run(main, parse_args)
