"""GPU check: inference, training-step and face-analysis figures of InstantID on this machine, in one table.

    bash benchmarks/gpu_check.sh                      # CUDA: real-size SDXL with random weights, ~15 min
    python benchmarks/gpu_check.py --reduced          # any machine: the tiny models, seconds (what the tests run)

Full version (CUDA): the real-size SDXL UNet, IdentityNet, face adapter, VAE and both text encoders are built from
configs/sdxl/*.json with random weights (nothing is downloaded) and measured as

* **train** — one training step (batch 1, 1024 px, bf16 autocast — fp16 where bf16 is missing —, frozen parts in
  that dtype, trained parts fp32, VAE encode and both text encoders inside the step as without caches) for each
  memory configuration of ``bench_memory.py``: adapter only / everything × gradient checkpointing × AdamW /
  AdamW8bit; the second of two steps is timed, the peak is ``torch.cuda.max_memory_allocated`` over both; then
  the 24 GB preset (everything, checkpointing, AdamW8bit stepped in backward, autocast cache off) the same way;
* **speed** — the step of ``train_instantId_sdxl.py --compile / --channels_last / --optimizer_impl`` (IdentityNet +
  adapter trained, gradient checkpointing): plain (PyTorch's AdamW default: foreach on CUDA), fused AdamW,
  channels-last, compile (inductor), all three; s/step = median of 3 steps after 2 warm-up ones (the first compiles:
  ``extra.first_step_s``), peak over all five, ``extra.x_plain`` = ratio to the plain row;
* **infer** — one 1024² image, 30 Euler steps, CFG, fp16, for the presets none / VAE slicing + tiling /
  ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` (s/image after a warm-up, peak allocated);
* **face** — ``get_face_info.py`` dataset mode over synthetic 1024-px images with the tiny antelopev2 pack on the
  provider it picks (CUDA when onnxruntime offers it): images/s.

Reduced version (``--reduced``, the default without CUDA): the tiny models of ``download.py --tiny`` at 64 px,
2 steps, CPU; peaks are the process's peak resident memory (``VmHWM``) instead; the compile rows are skipped there
unless ``--compile_backend`` names one (inductor compiles for minutes on a CPU). Out of memory in one row is
recorded as ``OOM`` and the check goes on. ``--json F`` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

FULL = dict(resolution=1024, steps=30, train_resolution=1024, face_images=64, face_size=1024)
REDUCED = dict(resolution=64, steps=2, train_resolution=64, face_images=4, face_size=256)
PRESETS = ("none", "vae_slicing_tiling", "model_cpu_offload", "sequential_cpu_offload")
TRAIN_CONFIGS = [
    (train, ckpt, opt)
    for train in ("adapter", "everything")
    for ckpt in (False, True)
    for opt in ("adamw", "adamw8bit")
]
# ---- 24 GB preset (issue 23; the launcher's PRESET=24gb): whole model, checkpointing, AdamW8bit stepped during
# backward (faceid/train/in_backward.py), autocast weight cache off. Its own rows, after TRAIN_CONFIGS'.
PRESET_24GB_CONFIGS = [("everything", True, "adamw8bit_in_backward")]
PRESET_24GB_NAME = "24 GB preset (everything, ckpt, 8-bit in backward)"
PROMPT = "a photo of a person, best quality"


@dataclass
class Row:
    section: str  # train / infer / face
    config: str
    value: float | None = None  # seconds per unit, or images/s for face
    unit: str = ""
    peak_gb: float | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)


# ---- memory ----------------------------------------------------------------------------------------------------
class Peak:
    """Peak memory of a block: CUDA allocated bytes on a GPU, the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            gc.collect()  # (on the CPU only tiny models run; a collection there costs more than it frees)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            import re

            text = Path("/proc/self/status").read_text()
            self.bytes = int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) * 1024
        return False


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


# ---- models ----------------------------------------------------------------------------------------------------
def real_pipeline(device, dtype, tmp: Path):
    """The InstantID pipeline at real SDXL size with random weights; the adapter goes through the real loader."""
    import sdxl_random as sr
    from transformers import CLIPTokenizer

    from ip_adapter.weights import write_adapter
    from pipeline_stable_diffusion_xl_instantid import StableDiffusionXLInstantIDPipeline

    t1, t2 = sr.write_tokenizers(tmp / "tokenizers")
    tok, tok2 = CLIPTokenizer.from_pretrained(t1), CLIPTokenizer.from_pretrained(t2)
    te, te2 = sr.build_text_encoders(tok, device, dtype)
    unet = sr.build_unet(device, dtype)
    controlnet = sr.build_identitynet(unet, device, dtype)
    # Adapter file: a random Resampler + random IP layers, written and loaded the way users' files are.
    resampler = sr.build_resampler("cpu", torch.float16)
    meta_unet = sr.build_unet("meta")
    with torch.device("meta"):
        layers = sr.install_ip_layers(meta_unet)
    g = torch.Generator().manual_seed(0)
    ip_state = {
        k: (torch.randn(v.shape, generator=g) * v.shape[1] ** -0.5).to(torch.float16)
        for k, v in layers.state_dict().items()
    }
    path = write_adapter(tmp / "ip-adapter.safetensors", resampler, ip_state)
    del resampler, ip_state, layers, meta_unet
    pipe = StableDiffusionXLInstantIDPipeline(
        vae=sr.build_vae(device, dtype),
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        controlnet=controlnet,
        scheduler=sr.build_scheduler(),
        add_watermarker=False,
    )
    pipe.load_ip_adapter_instantid(str(path), scale=0.8)
    path.unlink()
    return pipe


def tiny_pipeline(device, dtype, tiny_dir: Path):
    from faceid.tiny.models import build_tiny, tiny_paths
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    build_tiny(tiny_dir)
    p = tiny_paths(tiny_dir)
    return load_pipeline(
        p["base_model"], p["controlnet"], p["face_adapter"], device=device, dtype=dtype, progress=False
    )


def kps_image(size: int):
    import numpy as np
    from PIL import Image

    from faceid.face.kps import draw_kps

    s = size
    kps = np.array(
        [
            [0.38 * s, 0.42 * s],
            [0.62 * s, 0.42 * s],
            [0.5 * s, 0.55 * s],
            [0.41 * s, 0.68 * s],
            [0.59 * s, 0.68 * s],
        ]
    )
    return draw_kps(Image.new("RGB", (s, s)), kps)


# ---- train -----------------------------------------------------------------------------------------------------
def _set_trained(pipe, train: str, ckpt: bool, wdt) -> list:
    """Frozen parts in ``wdt``, trained ones fp32 with grad; returns the trained parameters."""
    from ip_adapter.weights import ip_modules

    unet, cn, res = pipe.unet, pipe.controlnet, pipe.image_proj_model
    for m in (unet, cn, res, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
        m.to(wdt)
    layers = ip_modules(unet)
    layers.to(torch.float32).requires_grad_(True)
    res.to(torch.float32).requires_grad_(True).train()
    if train == "everything":
        cn.to(torch.float32).requires_grad_(True).train()
    for m in (unet, cn):
        (m.enable_gradient_checkpointing if ckpt else m.disable_gradient_checkpointing)()
    return [p for m in (res, layers, cn) for p in m.parameters() if p.requires_grad]


def train_step(pipe, model, optimizer, batch, device, wdt, sched, autocast_cache: bool = True) -> float:
    """One step as the trainer takes it without caches: VAE encode, text encoders, forward under autocast,
    MSE on the noise, backward, optimizer step."""
    import torch.nn.functional as F

    t0 = time.perf_counter()
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(batch["pixels"].to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        out1 = pipe.text_encoder(batch["ids"], output_hidden_states=True)
        out2 = pipe.text_encoder_2(batch["ids2"], output_hidden_states=True)
        text = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = out2.text_embeds
    latents = latents.to(wdt)
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy = sched.add_noise(latents, noise, t)
    added = {"text_embeds": pooled.to(wdt), "time_ids": batch["time_ids"].to(wdt)}
    with torch.autocast(device.type, dtype=wdt, cache_enabled=autocast_cache):
        pred = model(noisy, t, text.to(wdt), added, batch["emb"], batch["kps"])
        loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    # Random weights in fp16 may overflow: memory and time are still what they are; the row says so.
    batch["finite"] = batch.get("finite", True) and bool(torch.isfinite(loss))
    return time.perf_counter() - t0


def train_batch(pipe, device, r: int) -> dict:
    """One sample at ``r`` px as the step reads it: pixels, token ids, micro-conditioning, face embedding, keypoints."""
    ids = [
        tok([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(
            device
        )
        for tok in (pipe.tokenizer, pipe.tokenizer_2)
    ]
    return dict(
        pixels=torch.rand(1, 3, r, r, device=device) * 2 - 1,
        ids=ids[0],
        ids2=ids[1],
        time_ids=torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=torch.float32),
        emb=torch.randn(1, 512, device=device),
        kps=torch.rand(1, 3, r, r, device=device),
    )


def check_train(pipe, device, wdt, resolution: int, configs=TRAIN_CONFIGS) -> list[Row]:
    from diffusers import DDPMScheduler

    from faceid.train.model import TrainModel

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    batch = train_batch(pipe, device, resolution)
    pipe.vae.to(torch.float32)
    rows = []
    for train, ckpt, opt_name in configs:
        name = f"{'adapter only' if train == 'adapter' else 'everything'}, ckpt {'on' if ckpt else 'off'}, "
        name += "AdamW8bit" if opt_name == "adamw8bit" else "AdamW"
        preset = opt_name == "adamw8bit_in_backward"
        name = PRESET_24GB_NAME if preset else name
        row = Row("train", name, unit="s/step", extra=dict(train=train, ckpt=ckpt, optimizer=opt_name))
        optimizer = None
        try:
            params = _set_trained(pipe, train, ckpt, wdt)
            model = TrainModel(pipe.unet, pipe.controlnet, pipe.image_proj_model)
            if opt_name.startswith("adamw8bit"):
                try:
                    import bitsandbytes as bnb
                except ImportError:
                    rows.append(Row("train", name, status="skipped: bitsandbytes not installed"))
                    continue
                if preset:
                    from faceid.train.in_backward import OptimizerInBackward

                    optimizer = OptimizerInBackward(bnb.optim.AdamW8bit, params, max_grad_norm=1.0, lr=1e-5)
                else:
                    optimizer = bnb.optim.AdamW8bit(params, lr=1e-5)
            else:
                optimizer = torch.optim.AdamW(params, lr=1e-5)
            row.extra["trained_params"] = sum(p.numel() for p in params)
            with Peak(device) as pk:
                train_step(pipe, model, optimizer, batch, device, wdt, sched, not preset)
                row.value = train_step(pipe, model, optimizer, batch, device, wdt, sched, not preset)
            row.peak_gb = pk.bytes / 1e9
            if not batch.pop("finite", True):
                row.status = "ok (non-finite loss: random weights)"
        except Exception as exc:  # one configuration's failure (OOM above all) must not end the check
            if not is_oom(exc):
                raise
            row.status = "OOM"
        finally:
            if hasattr(
                optimizer, "remove_hooks"
            ):  # the preset's hooks must not step the next rows' parameters
                optimizer.remove_hooks()
            del optimizer
            for p in pipe.controlnet.parameters():
                p.grad = None
            for m in (pipe.unet, pipe.controlnet, pipe.image_proj_model):
                for p in m.parameters():
                    p.grad = None
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        rows.append(row)
    for m in (pipe.unet, pipe.controlnet):
        m.disable_gradient_checkpointing()
    return rows


# ---- speed options (train_instantId_sdxl.py --compile / --channels_last / --optimizer_impl) ----------------------
SPEED_CONFIGS = {  # label -> (compile, channels_last, AdamW implementation; "default": PyTorch's for the device)
    "plain": (False, False, "default"),
    "fused AdamW": (False, False, "fused"),
    "channels-last": (False, True, "default"),
    "compile": (True, False, "default"),
    "compile + channels-last + fused": (True, True, "fused"),
}


def check_speed(pipe, device, wdt, resolution: int, reduced: bool, compile_backend=None) -> list[Row]:
    """IdentityNet + adapter trained with gradient checkpointing (the configuration of a full training), one row
    per speed option: s/step = median of the timed steps after the warm-up ones (compilation happens in the first;
    its seconds are ``extra.first_step_s``), peak over all of them. On the CPU (``--reduced``) compile rows are
    skipped unless ``compile_backend`` is given: inductor compiles there for minutes (bench_train_step.py has them)."""
    from diffusers import DDPMScheduler

    from faceid.train import speed
    from faceid.train.model import TrainModel

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    batch = train_batch(pipe, device, resolution)
    pipe.vae.to(torch.float32)
    warm, timed = (1, 2) if reduced else (2, 3)
    backend = compile_backend or (None if device.type == "cpu" else speed.COMPILE_BACKEND)
    rows, plain = [], None
    for label, (compiled, channels_last, impl) in SPEED_CONFIGS.items():
        row = Row("speed", f"everything, ckpt on, {label}", unit="s/step",
                  extra=dict(compile=compiled, channels_last=channels_last))  # fmt: skip
        if compiled and backend is None:
            row.status = (
                "skipped: inductor on this CPU compiles for minutes (--compile_backend aot_eager runs it)"
            )
            rows.append(row)
            continue
        optimizer, model = None, None
        try:
            params = _set_trained(pipe, "everything", True, wdt)
            model = TrainModel(pipe.unet, pipe.controlnet, pipe.image_proj_model)
            if channels_last:
                speed.set_channels_last([pipe.unet, pipe.controlnet, pipe.vae])
                model.channels_last = True
            if compiled:
                speed.compile_forwards(model, backend=backend)
                row.extra["backend"] = backend
            optimizer = torch.optim.AdamW(params, lr=1e-5, **({} if impl == "default" else speed.adamw_kwargs(impl, params)))  # fmt: skip
            row.extra["optimizer"] = speed.adamw_impl_name(optimizer)
            with Peak(device) as pk:
                times = [
                    train_step(pipe, model, optimizer, batch, device, wdt, sched) for _ in range(warm + timed)
                ]
            row.value = statistics.median(times[warm:])
            row.peak_gb = pk.bytes / 1e9
            row.extra["first_step_s"] = round(times[0], 3)
            if plain is not None and plain.value:
                row.extra["x_plain"] = round(row.value / plain.value, 3)
            if not batch.pop("finite", True):
                row.status = "ok (non-finite loss: random weights)"
        except Exception as exc:  # OOM, or a compiler missing on this machine: recorded, the check goes on
            row.status = (
                "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            )
        finally:
            del optimizer
            if model is not None:
                speed.eager_forwards(model)
            speed.set_channels_last([pipe.unet, pipe.controlnet, pipe.vae], on=False)
            for m in (pipe.unet, pipe.controlnet, pipe.image_proj_model):
                for p in m.parameters():
                    p.grad = None
            if compiled:
                torch._dynamo.reset()
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        if label == "plain":
            plain = row
        rows.append(row)
    for m in (pipe.unet, pipe.controlnet):
        m.disable_gradient_checkpointing()
    return rows


# ---- inference -------------------------------------------------------------------------------------------------
def check_infer(pipe, device, dtype, resolution: int, steps: int, presets=PRESETS) -> list[Row]:
    import numpy as np

    for m in (pipe.unet, pipe.controlnet, pipe.image_proj_model, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False).eval()
    pipe.to(device, dtype)
    pipe.image_proj_model.to(device, dtype)
    pipe.vae.to(dtype)
    kps = kps_image(resolution)
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)

    def generate(n_steps: int):
        g = torch.Generator(device="cpu").manual_seed(0)
        out = pipe(
            PROMPT,
            image_embeds=emb,
            image=kps,
            height=resolution,
            width=resolution,
            num_inference_steps=n_steps,
            generator=g,
            output_type="np",
        ).images
        if out.shape != (1, resolution, resolution, 3):
            raise AssertionError(f"image of shape {out.shape}")
        return out

    generate(2)  # warm-up: kernels, allocator
    rows = []
    for preset in presets:
        row = Row("infer", preset, unit="s/image", extra=dict(steps=steps, resolution=resolution))
        if preset == "sequential_cpu_offload" and device.type == "cpu":
            # accelerate's CPU execution device leaves plain tensors in place of parameters and then fails.
            row.status = "skipped: needs an accelerator"
            rows.append(row)
            continue
        try:
            if preset == "vae_slicing_tiling":
                pipe.vae.enable_slicing()
                pipe.vae.enable_tiling()
            elif preset == "model_cpu_offload":
                pipe.vae.disable_slicing()
                pipe.vae.disable_tiling()
                pipe.enable_model_cpu_offload(device=device)
            elif preset == "sequential_cpu_offload":
                pipe.enable_sequential_cpu_offload(device=device)
            with Peak(device) as pk:
                t0 = time.perf_counter()
                generate(steps)
                sync(device)
                row.value = time.perf_counter() - t0
            row.peak_gb = pk.bytes / 1e9
        except Exception as exc:
            if not is_oom(exc):
                raise
            row.status = "OOM"
        rows.append(row)
    return rows


# ---- face analysis ---------------------------------------------------------------------------------------------
def check_face(tiny_dir: Path, n: int, size: int, tmp: Path) -> list[Row]:
    from bench_face_info import make_images

    import get_face_info
    from faceid.face.analysis import choose_providers
    from faceid.tiny.models import build_tiny, tiny_paths

    build_tiny(tiny_dir)
    folder, out = tmp / "faces", tmp / "face_info"
    make_images(folder, n, size)
    providers = choose_providers()[0]
    args = get_face_info.parse_args(
        ["--input", str(folder), "--output", str(out), "--root", str(tiny_paths(tiny_dir)["face_root"])]
        + ["--no_progress"]
    )
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = get_face_info.main(args)
    seconds = time.perf_counter() - t0
    if rc not in (0, None):
        raise RuntimeError(f"get_face_info.py returned {rc}")
    found = sum(1 for ln in (out / "index.jsonl").read_text().splitlines() if ln.strip())
    return [
        Row(
            "face",
            f"get_face_info, {n} images {size} px, {providers[0]}",
            value=n / seconds,
            unit="images/s",
            extra=dict(providers=providers, faces_found=found, images=n),
        )
    ]


# ---- table -----------------------------------------------------------------------------------------------------
def format_table(rows: list[Row], header: dict) -> str:
    lines = [
        "GPU check: " + ", ".join(f"{k} {v}" for k, v in header.items()),
        f"{'section':8s} {'configuration':52s} {'value':>10s} {'unit':9s} {'peak GB':>8s}  status",
    ]
    for r in rows:
        value = f"{r.value:10.3f}" if r.value is not None else f"{'-':>10s}"
        pk = f"{r.peak_gb:8.2f}" if r.peak_gb is not None else f"{'-':>8s}"
        lines.append(f"{r.section:8s} {r.config:52s} {value} {r.unit:9s} {pk}  {r.status}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="tiny models, tiny sizes (default without CUDA)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--tiny", default=None, help="tiny checkpoints folder (built when missing; default: a temp dir)"
    )
    p.add_argument("--sections", default="train,speed,infer,face")
    p.add_argument(
        "--compile_backend",
        default=None,
        help="speed rows' torch.compile backend (default: inductor on CUDA)",
    )
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--train_resolution", type=int, default=None)
    p.add_argument("--face_images", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows (and the header) here")
    return p.parse_args(argv)


def main(args) -> list[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reduced = args.reduced or device.type != "cuda"
    sizes = dict(REDUCED if reduced else FULL)
    for k in ("resolution", "steps", "train_resolution", "face_images"):
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    if device.type == "cuda":
        infer_dtype = torch.float16
        train_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        infer_dtype, train_dtype = torch.float32, torch.bfloat16
    sections = args.sections.split(",")
    header = dict(
        device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        models="tiny (reduced)" if reduced else "real-size SDXL, random weights",
        torch=torch.__version__,
        infer=f"{sizes['resolution']}² {sizes['steps']} steps {str(infer_dtype).split('.')[-1]}",
        train=f"{sizes['train_resolution']} px batch 1 {str(train_dtype).split('.')[-1]} autocast",
    )
    rows: list[Row] = []
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Tiny ops: one thread. Two threads on a shared CPU wait at every op's barrier for a descheduled partner
        # (measured here: a tiny training step 0.6 s with one thread, 5-25 s with two).
        torch.set_num_threads(1)
    try:
        _run(args, device, reduced, sizes, sections, infer_dtype, train_dtype, header, rows)
    finally:
        torch.set_num_threads(threads)
    header["total_s"] = round(time.perf_counter() - t_start, 1)
    print(format_table(rows, header))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1)
        )
    return rows


def _run(args, device, reduced, sizes, sections, infer_dtype, train_dtype, header, rows) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tiny_dir = Path(args.tiny) if args.tiny else tmp / "tiny"
        if "train" in sections or "speed" in sections or "infer" in sections:
            t0 = time.perf_counter()
            if reduced:
                pipe = tiny_pipeline(device, infer_dtype, tiny_dir)
            else:
                pipe = real_pipeline(device, infer_dtype, tmp)
            header["build_s"] = round(time.perf_counter() - t0, 1)
            if "train" in sections:
                rows += check_train(pipe, device, train_dtype, sizes["train_resolution"])
                rows += check_train(pipe, device, train_dtype, sizes["train_resolution"], PRESET_24GB_CONFIGS)
            if "speed" in sections:
                rows += check_speed(
                    pipe, device, train_dtype, sizes["train_resolution"], reduced, args.compile_backend
                )
            if "infer" in sections:
                rows += check_infer(pipe, device, infer_dtype, sizes["resolution"], sizes["steps"])
            del pipe
            gc.collect()
        if "face" in sections:
            rows += check_face(tiny_dir, sizes["face_images"], sizes["face_size"], tmp)


if __name__ == "__main__":
    main(parse_args())
