"""Train InstantID (Resampler + face IP layers + IdentityNet) on SDXL, with cross-identity pairs.

    accelerate launch train_instantId_sdxl.py --pretrained_model_name_or_path SDXL \
        --controlnet_model_name_or_path checkpoints/ControlNetModel \
        --pretrained_ip_adapter_path checkpoints/ip-adapter.bin \
        --data_json_file index.jsonl --cross_id --output_dir out

See docs/training.md. ``main`` reads as the stages of a run; the work lives in faceid/train/ (config.py: the flags,
checks and data set-up shared with precompute_cache.py; model.py: models and the loss; dataset.py, records.py,
transforms.py, webdataset_shards.py: data; checkpoints.py, ema.py). Tests and experiments pass
``main(args, hooks=TrainHooks(...))`` (faceid/train/config.py) instead of patching.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from types import SimpleNamespace

from faceid.train import config, speed
from faceid.train.config import TrainHooks
from faceid.train.steps import (
    Run,
    Schedule,
    StepLogs,
    forward_backward,
    make_optimizer,
    optimizer_step,
    resume,
    skip_update,
    step_scalars,
)

# ---- defaults (edit here) -----------------------------------------------------------------------------------
MODEL_NAME = config.MODEL_NAME
OUTPUT_DIR = "instantid-output"
RESOLUTION = 1024
LEARNING_RATE = 1e-5
TRAIN_BATCH_SIZE = 2
CHECKPOINTING_STEPS = 2000
VALIDATION_PROMPTS = (
    "a photo of a person, best quality",
    "a portrait of a person as an astronaut, film grain",
)
MAX_NONFINITE_IN_A_ROW = 10
EMA_DECAY = 0.9999
ID_LOSS_RECOGNIZER = "models/antelopev2/glintr100.onnx"  # antelopev2's ArcFace (get_face_info's --root)
ID_LOSS_MAX_TIMESTEP = 400  # above it the one-step x0 estimate is too blurry to recognise a face

logger = logging.getLogger("train_instantid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("models")
    config.add_model_flags(g, MODEL_NAME)
    g.add_argument(
        "--controlnet_model_name_or_path", default=None, help="IdentityNet; default: from the UNet"
    )
    g.add_argument(
        "--pretrained_ip_adapter_path", default=None, help="ip-adapter.bin/.safetensors; default fresh"
    )
    g.add_argument("--num_tokens", type=int, default=16, help="face tokens of a fresh Resampler")
    g.add_argument("--resampler_dim", type=int, default=1280)
    g.add_argument("--resampler_depth", type=int, default=4)
    g.add_argument("--resampler_dim_head", type=int, default=64)
    g.add_argument("--resampler_heads", type=int, default=20)
    g.add_argument("--resampler_ff_mult", type=int, default=4)
    g.add_argument("--train_identitynet", action=B, default=True)
    g.add_argument("--train_resampler", action=B, default=True)
    g.add_argument("--train_ip_layers", action=B, default=True)

    g = p.add_argument_group("data")
    config.add_data_flags(g, RESOLUTION)
    g.add_argument("--shard_retries", type=int, default=3, help="further attempts after a failed shard read")
    g.add_argument(
        "--shard_lanes",
        type=int,
        default=1,
        help="remote shards: = --dataloader_num_workers reads each shard once",
    )
    g.add_argument(
        "--skip_bad_shards", action="store_true", help="go on without an unreadable shard (bad_shards.jsonl)"
    )
    g.add_argument(
        "--person_id_from_folder", action="store_true", help="person = the image's parent folder name"
    )
    g.add_argument(
        "--cross_id", action="store_true", help="face embedding from another image of the same person"
    )
    g.add_argument("--cross_id_prob", type=float, default=1.0)
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crop")
    g.add_argument("--center_crop", action="store_true", help="(default; MFaceTech flag accepted)")
    g.add_argument("--random_flip", type=float, default=0.0, help="probability of a mirrored sample")
    g.add_argument("--text_drop_rate", type=float, default=0.05)
    g.add_argument("--text_drop_zeros", action=B, default=True,
                   help="a dropped caption becomes zero text embeddings, the unconditional input SDXL was trained "
                        "with and its pipeline gives CFG (--no-text_drop_zeros: encode the empty caption)")  # fmt: skip
    g.add_argument("--face_drop_rate", type=float, default=0.05)
    g.add_argument("--both_drop_rate", type=float, default=0.05)
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--cache_latents", action="store_true", help="keep VAE posteriors in memory (centre crop)")
    g.add_argument("--cache_text_embeddings", action="store_true")
    g.add_argument(
        "--precomputed_cache",
        default=None,
        help="folder written by precompute_cache.py: latents/text embeddings read instead of computed",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", default=OUTPUT_DIR)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--train_batch_size", type=int, default=TRAIN_BATCH_SIZE, help="per device")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    g.add_argument("--scale_lr", action="store_true", help="lr × GPUs × batch × accumulation")
    g.add_argument("--lr_scheduler", default="constant_with_warmup")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--optimizer_in_backward", action="store_true",
                   help="step each parameter in backward as its gradient arrives, then free it: gradients are "
                        "never all held (24 GB preset; one process, no accumulation, bf16/fp32; --max_grad_norm "
                        "clips per parameter)")  # fmt: skip
    g.add_argument("--autocast_cache", action=B, default=True,
                   help="autocast keeps each trained weight's bf16/fp16 copy until the forward ends (3.35 GB for "
                        "IdentityNet + adapter); --no-autocast_cache casts per use instead (24 GB preset)")  # fmt: skip
    g.add_argument("--optimizer_impl", default="auto", choices=speed.OPTIMIZER_IMPLS,
                   help="torch AdamW's implementation; auto: fused on CUDA, else PyTorch's default (not for "
                        "--use_8bit_adam)")  # fmt: skip
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and IdentityNet forward (the first step compiles: minutes)")  # fmt: skip
    g.add_argument("--compile_mode", default="default",
                   help="torch.compile mode: default, max-autotune-no-cudagraphs, ...")  # fmt: skip
    g.add_argument("--compile_backend", default=speed.COMPILE_BACKEND,
                   help="torch.compile backend (aot_eager: the same graph capture without code generation)")  # fmt: skip
    g.add_argument("--channels_last", action="store_true",
                   help="UNet, IdentityNet and VAE convolutions in NHWC memory format (faster on GPUs)")  # fmt: skip
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", "--weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR weighting (5.0 is usual)")
    g.add_argument("--id_loss_weight", type=float, default=0.0, help="identity loss weight (0: off)")
    g.add_argument(
        "--id_loss_max_timestep",
        type=int,
        default=ID_LOSS_MAX_TIMESTEP,
        help="identity loss only below this t",
    )
    g.add_argument(
        "--id_loss_recognizer",
        default=ID_LOSS_RECOGNIZER,
        help="face recognizer ONNX ([N,3,112,112] -> [N,D])",
    )
    g.add_argument("--id_loss_margin", type=int, default=2, help="latent pixels decoded around the face box")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="keep an EMA of the trained weights; export it as the final weights",
    )
    g.add_argument("--ema_decay", type=float, default=EMA_DECAY)
    g.add_argument(
        "--max_nonfinite_steps", type=int, default=MAX_NONFINITE_IN_A_ROW, help="stop after K in a row"
    )

    g = p.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--checkpointing_steps", "--save_steps", type=int, default=CHECKPOINTING_STEPS)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N path")
    g.add_argument("--validation_steps", type=int, default=0, help="validate every N steps (0: never)")
    g.add_argument("--validation_prompt", action="append", default=None)
    g.add_argument("--num_validation_faces", type=int, default=2)
    g.add_argument("--validation_steps_count", type=int, default=30, help="denoising steps for validation")
    g.add_argument("--validation_guidance_scale", type=float, default=5.0)
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument(
        "--log_phase_times",
        action="store_true",
        help="log the seconds of each step spent in VAE, text encoders, forward/backward, optimizer",
    )
    g.add_argument("--tracker_project_name", default="instantid")
    g.add_argument(
        "--log_samples",
        action=B,
        default=True,
        help="append each step's item/reference ids to OUTPUT/samples/rank-R.jsonl",
    )
    # ---- identity monitoring (issue 21; faceid/train/monitor.py, docs/training.md) ----
    g = p.add_argument_group("identity monitoring")
    g.add_argument("--validation_persons", type=int, default=0,
                   help="hold this many persons (2+ photos each) out of training; at --validation_steps score "
                        "generations of them: Face Sim same/different person, margin, copy-paste (0: off)")  # fmt: skip
    g.add_argument("--validation_index", default=None,
                   help="score validation on this index's persons instead (first photo = reference)")  # fmt: skip
    g.add_argument("--validation_max_persons", type=int, default=8)
    g.add_argument("--validation_face_model", default=os.path.dirname(ID_LOSS_RECOGNIZER),
                   help="insightface pack (antelopev2) that scores validation")  # fmt: skip
    g.add_argument("--validation_clip_model", default=None, help="CLIP model folder: also log CLIP-T")
    g.add_argument(
        "--validation_identity_prompt", default=None, help="default: the reference photo's caption"
    )
    g.add_argument("--collapse_check_steps", type=int, default=0,
                   help="every N steps log the face-token spread and loss gap; warn once on collapse (0: off)")  # fmt: skip
    g.add_argument("--collapse_probe_persons", type=int, default=8)
    args = p.parse_args(argv)
    return args


def check_args(args) -> None:
    """Flag combinations argparse cannot express; a bad one is a :class:`TrainingInputError` naming the flags."""
    from faceid.train.errors import TrainingInputError

    config.check_source(args)
    if args.cache_latents and (args.random_crop or args.random_flip > 0):
        raise TrainingInputError(
            "--cache_latents needs a deterministic view: drop --random_crop/--random_flip"
        )
    if args.train_shards and args.cache_latents:
        raise TrainingInputError("--train_shards streams fixed-size samples: no --cache_latents")
    if args.precomputed_cache:
        if args.random_crop:
            raise TrainingInputError(
                "--precomputed_cache holds the centre crop of each bucket: drop --random_crop (or train without it)"
            )
        if args.cache_latents or args.cache_text_embeddings:
            raise TrainingInputError(
                "--precomputed_cache replaces --cache_latents/--cache_text_embeddings: drop them"
            )
    if args.use_8bit_adam and args.optimizer_impl != "auto":
        raise TrainingInputError(
            "--optimizer_impl chooses torch AdamW's implementation: drop it with --use_8bit_adam"
        )
    if not (args.train_identitynet or args.train_resampler or args.train_ip_layers):
        raise TrainingInputError("nothing to train: enable at least one of IdentityNet, Resampler, IP layers")
    if args.use_ema and not 0.0 <= args.ema_decay < 1.0:
        raise TrainingInputError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.id_loss_weight > 0 and not os.path.isfile(args.id_loss_recognizer):
        raise TrainingInputError(
            f"--id_loss_weight needs a recognizer ONNX: {args.id_loss_recognizer} not found "
            "(python download.py fetches antelopev2; or pass --id_loss_recognizer PATH)"
        )
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        from faceid.train.checkpoints import resolve_resume

        resolve_resume(args.output_dir, args.resume_from_checkpoint)  # fails before the models load


def validation_request(args, embedding, kps, size, prompt: str, seed: int):
    """What validation generates (the grid and identity validation alike), as a request for the one generation
    path: the weights as training uses them (IP scale 1), the trainer's validation steps and guidance, and no
    negative prompt (SDXL's zero embeddings, the unconditional input training drops captions to)."""
    import numpy as np

    from faceid.generation.request import GenerationRequest

    return GenerationRequest(
        prompt=prompt,
        embeds=embedding,
        kps=np.asarray(kps, np.float32),
        size=(int(size[0]), int(size[1])),
        negative_prompt=None,
        steps=args.validation_steps_count,
        guidance_scale=args.validation_guidance_scale,
        ip_adapter_scale=1.0,
        seed=int(seed),
    )


def validation_pipeline(parts, model):
    """The InstantID pipeline around the weights being trained (no copies)."""
    from diffusers import EulerDiscreteScheduler

    from pipeline_stable_diffusion_xl_instantid import StableDiffusionXLInstantIDPipeline

    pipe = StableDiffusionXLInstantIDPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer_2"],
        unet=model.unet,
        controlnet=model.controlnet,
        scheduler=EulerDiscreteScheduler.from_config(parts["noise_scheduler"].config),
        add_watermarker=False,
    )
    pipe.image_proj_model = model.image_proj
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_images(parts, model, accelerator, requests) -> list:
    """The images of ``requests`` (:func:`validation_request`) through the one generation
    path (:func:`faceid.generation.request.generate`), with the weights being trained."""
    import torch

    from faceid.generation.request import generate

    was_training = [m.training for m in (model.controlnet, model.image_proj)]
    model.eval()
    pipe, images = validation_pipeline(parts, model), []
    with torch.no_grad(), accelerator.autocast():
        for request in requests:
            images += generate(pipe, request)
    model.controlnet.train(was_training[0])
    model.image_proj.train(was_training[1])
    return images


def log_validation(parts, model, items, prompts, args, step, accelerator):
    """Generate one image per (face, prompt) with the weights being trained; save the grid to
    ``OUTPUT/validation/step-N.png`` and send it to the trackers. Returns the grid's path."""
    import numpy as np
    from PIL import Image

    # The same seed every time: grids of successive steps differ only by the weights.
    requests = [
        validation_request(args, emb, kps, size, prompt, args.seed or 0)
        for emb, kps, size in items
        for prompt in prompts
    ]
    images = validation_images(parts, model, accelerator, requests)
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(prompts), h * len(items)))
    for k, img in enumerate(images):
        grid.paste(img, ((k % len(prompts)) * w, (k // len(prompts)) * h))
    out = os.path.join(args.output_dir, "validation", f"step-{step:07d}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    grid.save(out)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(prompts))]}, step=step)
    return out


def main(args, hooks: TrainHooks | None = None):
    """Train; returns ``SimpleNamespace(global_step, model, parts, completed)``. ``hooks``: explicit seams for
    tests and experiments (:class:`faceid.train.config.TrainHooks`); None is the trainer as shipped."""
    from tqdm.auto import tqdm

    import faceid.train.model as training
    from faceid.train import checkpoints as ckpt
    from faceid.train.ema import EMA
    from faceid.train.monitor import TrainingMonitor

    hooks = hooks or TrainHooks()
    check_args(args)

    # 1. Accelerator and logging
    accelerator, log, report_to = make_accelerator(args)
    # Frozen weights run in the mixed-precision dtype; trained weights stay fp32 (their updates are tiny).
    weight_dtype = config.weight_dtype(accelerator.mixed_precision)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. Models: frozen SDXL (VAE, text encoders, UNet), trained IdentityNet, Resampler and IP layers
    parts = load_models(args, weight_dtype, accelerator.device)

    # 3. Data: every rank reads its own deterministic share (a function of seed, epoch, batch)
    data = config.build_data(args, (parts["tokenizer"], parts["tokenizer_2"]), rank, world, log, enc=parts)
    sched = make_schedule(args, accelerator, data.batches_per_epoch)

    # 4. Optimizer and learning-rate schedule, over the trained parameters only
    params = (hooks.trainable_parameters or training.trainable_parameters)(parts["model"])
    optimizer, lr_scheduler = make_optimizer(args, params, sched.accum, world, sched.max_steps)

    # 5. Prepare for the launch setup, then resume: checkpoints hold the trained weights in the official layout
    model, optimizer, lr_scheduler = accelerator.prepare(parts["model"], optimizer, lr_scheduler)
    ckpt.register_hooks(accelerator, accelerator.unwrap_model)
    parts["model"] = model
    unwrapped = accelerator.unwrap_model(model)
    # The average starts from the weights training starts with (resume replaces it with the saved one).
    ema = EMA(unwrapped, args.ema_decay) if args.use_ema else None
    global_step = resume(args, accelerator, log, sched.batches_per_epoch, sched.accum, world, unwrapped, ema)
    first_epoch, start_update = divmod(global_step, sched.updates_per_epoch)
    run = Run(args, accelerator, parts, model, unwrapped, params, optimizer, lr_scheduler, ema, weight_dtype,
              training.CondCache(args.cache_latents, args.cache_text_embeddings), sched, hooks,
              hooks.compute_loss or training.compute_loss)  # fmt: skip

    # 6. Trackers, the run's arguments, validation faces
    start_tracking(args, accelerator, report_to)
    val_items, val_prompts = validation_setup(args, accelerator, data.records, log)
    log.info(
        f"{len(data.dataset)} items, {sched.batches_per_epoch} batches/epoch/process, {world} processes, "
        f"{sched.max_steps} steps, {sched.num_epochs} epochs; starting at step {global_step}"
    )

    # 7. Training loop
    bar = tqdm(
        range(sched.max_steps),
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    logs_out = StepLogs(args, rank, accelerator)
    nonfinite_in_a_row = 0
    # Identity on held-out persons and the collapse probe (faceid/train/monitor.py): a silent collapse shows here.
    monitor = None
    if accelerator.is_main_process and TrainingMonitor.wanted(args):
        monitor = TrainingMonitor(
            args, parts, unwrapped, data.records, getattr(data.dataset, "held_out", []), weight_dtype,
            accelerator.device, logs_out.scalars,
            lambda reqs: validation_images(parts, unwrapped, accelerator, [validation_request(args, *r) for r in reqs]),
            log, accelerator.autocast,
        )  # fmt: skip
        if global_step == 0:
            monitor.at_step(0)  # the start values (a resumed run reads them from train_log.jsonl)
    for epoch in range(first_epoch, sched.num_epochs):
        if global_step >= sched.max_steps:
            break
        first_u = start_update if epoch == first_epoch else 0
        if args.cache_latents and hasattr(data.dataset, "with_pixels"):
            # Once every posterior is cached the loader stops decoding images.
            data.dataset.with_pixels = len(run.cache.latents) < len(data.dataset)
        # Resuming mid-epoch: the loader starts at the first unseen batch, without loading the ones before.
        loader = iter(data.loader(epoch, first_u * sched.accum))
        for u in range(first_u, sched.updates_per_epoch):
            # 7a. Forward and backward over the update's micro-batches
            step = forward_backward(run, loader, epoch, u)
            # 7b. Optimizer step; a non-finite loss skips the update instead
            grad_norm = None
            if step.bad:
                nonfinite_in_a_row = skip_update(run, global_step, nonfinite_in_a_row, log)
            else:
                nonfinite_in_a_row = 0
                grad_norm = optimizer_step(run, step)
            global_step += 1
            bar.update(1)
            # 7c. Logs, checkpoint, validation
            logs_out.samples(global_step, None if step.bad else step.losses, step.samples)
            if not step.bad:
                logs = step_scalars(run, step, grad_norm)
                logs_out.scalars(global_step, logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                path = ckpt.save_checkpoint(accelerator, args.output_dir, global_step,
                                            sched.trainer_state(global_step, world, args.seed),
                                            args.checkpoints_total_limit,
                                            write_extra=ema.save if ema is not None else None)  # fmt: skip
                log.info(f"Saved {path}")
            if (
                args.validation_steps
                and global_step % args.validation_steps == 0
                and accelerator.is_main_process
                and val_items
            ):
                out = log_validation(parts, unwrapped, val_items, val_prompts, args, global_step, accelerator)
                log.info(f"Validation grid: {out}")
            if monitor is not None:
                monitor.at_step(global_step)
            if global_step >= sched.max_steps:
                break
            if hooks.stop_after_steps and global_step >= hooks.stop_after_steps:
                log.warning(f"hooks.stop_after_steps: stopping at step {global_step} without final export")
                accelerator.end_training()
                return SimpleNamespace(global_step=global_step, model=unwrapped, parts=parts, completed=False)
        del loader

    # 8. Export the final weights in the layout inference loads (the EMA when on)
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(unwrapped)
    if accelerator.is_main_process:
        ckpt.export_weights(args.output_dir, unwrapped)
        log.info(f"Final weights: {args.output_dir}/ip-adapter.bin, {args.output_dir}/ControlNetModel/")
        bad_shards = getattr(data.dataset, "bad_shards", None)
        if bad_shards and bad_shards():
            log.warning(f"skipped unreadable shards (see {args.output_dir}/bad_shards.jsonl): {bad_shards()}")
    accelerator.end_training()
    return SimpleNamespace(global_step=global_step, model=unwrapped, parts=parts, completed=True)


# ---------------------------------------------------------------------------------------------------------------
# The stages of main


def make_accelerator(args):
    """→ (accelerator, logger, report_to)."""
    import torch
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import AutocastKwargs, ProjectConfiguration

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report_to = None if args.report_to == "none" else args.report_to
    if not torch.distributed.is_initialized():
        # main() may run several times in one process (tests, notebooks): start from a clean accelerate state.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # Several processes without CUDA (torchrun on CPU): gloo.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[] if args.autocast_cache else [AutocastKwargs(cache_enabled=False)],
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator, get_logger("train_instantid"), report_to


def load_models(args, weight_dtype, device) -> dict:
    """The components (faceid.train.model.load_components) plus the identity loss when it is on."""
    import faceid.train.model as training

    parts = training.load_components(args, weight_dtype, device)
    if args.id_loss_weight > 0:
        # Frozen recognizer (the ONNX run by torch); only the face region is decoded, see faceid/train/identity.py.
        from faceid.train.identity import IdentityLoss

        parts["id_loss"] = IdentityLoss(
            args.id_loss_recognizer, args.id_loss_max_timestep, args.id_loss_margin, device
        )
    return parts


def make_schedule(args, accelerator, batches_per_epoch: int) -> Schedule:
    from accelerate.utils import DistributedType

    from faceid.train.errors import TrainingInputError

    accum = max(1, args.gradient_accumulation_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accum > 1:
        raise TrainingInputError(
            "with DeepSpeed set gradient_accumulation_steps in its config and pass --gradient_accumulation_steps 1"
        )
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    return Schedule(
        accum, batches_per_epoch, updates_per_epoch, max_steps, math.ceil(max_steps / updates_per_epoch)
    )


def start_tracking(args, accelerator, report_to) -> None:
    """Trackers and ``train_args.json`` (main process)."""
    if not accelerator.is_main_process:
        return
    cfg = {
        k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
        for k, v in vars(args).items()
    }
    if report_to:
        accelerator.init_trackers(
            args.tracker_project_name, config={k: v for k, v in cfg.items() if v is not None}
        )
    with open(os.path.join(args.output_dir, "train_args.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def validation_setup(args, accelerator, records, log):
    """→ (validation faces, prompts); no faces when validation is off, on other processes, or with shards."""
    import faceid.train.model as training

    val_items, val_prompts = [], args.validation_prompt or list(VALIDATION_PROMPTS)
    if args.validation_steps and accelerator.is_main_process:
        if records:
            val_items = training.validation_items(records, args.resolution, args.num_validation_faces)
        else:
            log.warning("validation uses faces from an index; with --train_shards it is skipped")
    return val_items, val_prompts


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
