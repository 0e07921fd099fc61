"""Train InstantID (Resampler + face IP layers + IdentityNet) on SDXL, with cross-identity pairs.

    accelerate launch train_instantId_sdxl.py --pretrained_model_name_or_path SDXL \
        --controlnet_model_name_or_path checkpoints/ControlNetModel \
        --pretrained_ip_adapter_path checkpoints/ip-adapter.bin \
        --data_json_file index.jsonl --cross_id --output_dir out

See docs/training.md. Heavy lifting lives in faceid/train/model.py, faceid/train_*.py, faceid/train/transforms.py and
faceid/train/webdataset_shards.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from types import SimpleNamespace

# ---- defaults (edit here) -----------------------------------------------------------------------------------
MODEL_NAME = "stabilityai/stable-diffusion-xl-base-1.0"
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
    g.add_argument(
        "--pretrained_model_name_or_path", default=MODEL_NAME, help="SDXL diffusers folder or hub id"
    )
    g.add_argument("--revision", default=None)
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="e.g. a fp16-safe SDXL VAE")
    g.add_argument(
        "--vae_in_weight_dtype", action=B, default=True, help="keep a given VAE in the weight dtype"
    )
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
    g.add_argument(
        "--data_json_file", default=None, help="index JSONL (get_face_info / MFaceTech / seed format)"
    )
    g.add_argument("--train_data_dir", default=None, help="FaceID-6M folder (N.png, N.npy, *.jsonl)")
    g.add_argument(
        "--train_shards",
        default=None,
        help="WebDataset shard folder (python -m faceid.train.webdataset_shards)",
    )
    g.add_argument(
        "--data_format", default="auto", choices=["auto", "index", "mfacetech", "seed", "faceid6m"]
    )
    g.add_argument(
        "--data_root_path", default=None, help="root for relative paths (default: the index's folder)"
    )
    g.add_argument(
        "--person_id_from_folder", action="store_true", help="person = the image's parent folder name"
    )
    g.add_argument(
        "--cross_id", action="store_true", help="face embedding from another image of the same person"
    )
    g.add_argument("--cross_id_prob", type=float, default=1.0)
    g.add_argument("--skip_bad_samples", action="store_true")
    g.add_argument("--resolution", type=int, default=RESOLUTION)
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crop")
    g.add_argument("--center_crop", action="store_true", help="(default; MFaceTech flag accepted)")
    g.add_argument("--random_flip", type=float, default=0.0, help="probability of a mirrored sample")
    g.add_argument("--aspect_ratio_buckets", action="store_true", help="SDXL buckets scaled to --resolution")
    g.add_argument("--bucket_multiple", type=int, default=None)
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
        "--stop_after_steps", type=int, default=None, help=argparse.SUPPRESS
    )  # tests: simulate a kill
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


def open_disk_cache(args, enc: dict, source: dict, buckets, item_ids, captions):
    """The ``--precomputed_cache``, checked against this run's settings and data (or a message naming the
    difference); ``None`` without the flag."""
    if not args.precomputed_cache:
        return None
    from faceid.train import disk_cache as dc

    cache = dc.DiskCache(args.precomputed_cache)
    built = cache.manifest
    flip = built["flip"]
    if args.random_flip > 0 and flip != "both":
        flip = f"both (for --random_flip {args.random_flip})"
    wanted = dc.expected_manifest(enc, source, args.resolution, buckets, flip, built["what"])
    hint = "Rebuild it with precompute_cache.py and this run's model/data/resolution/bucket/flip flags."
    dc.check_manifest(built, wanted, args.precomputed_cache, hint)
    cache.check_complete(item_ids, captions)
    return cache


def build_data(args, tokenizers, rank, world, log, enc=None):
    """→ (dataset, records or None, loader_factory(epoch, start_batch), batches_per_epoch). ``enc`` (the loaded
    encoders) is needed to check a ``--precomputed_cache``."""
    import torch

    from faceid.train.dataset import EpochBatchSampler, FaceTrainDataset, collate

    common = dict(
        resolution=args.resolution,
        seed=args.seed,
        random_crop=args.random_crop,
        flip_prob=args.random_flip,
        cross_id=args.cross_id,
        cross_id_prob=args.cross_id_prob,
        text_drop=args.text_drop_rate,
        face_drop=args.face_drop_rate,
        both_drop=args.both_drop_rate,
    )
    workers = args.dataloader_num_workers
    if args.train_shards:
        from faceid.train.webdataset_shards import ShardDataset

        ds = ShardDataset(
            args.train_shards,
            tokenizers,
            batch_size=args.train_batch_size,
            rank=rank,
            world_size=world,
            **common,
        )
        if args.precomputed_cache:
            metas = [meta for meta, _ in ds.cache_views()]
            source = {"kind": "shards", "path": os.path.abspath(args.train_shards), "items": len(metas)}
            ds.disk_cache = open_disk_cache(
                args, enc, source, None, [m["id"] for m in metas], [m["caption"] for m in metas]
            )

        def factory(epoch, start):
            ds.set_epoch(epoch, start)
            return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)

        return ds, None, factory, ds.num_batches()

    from faceid.train.records import load_checked_records
    from faceid.train.transforms import scaled_buckets

    path = args.data_json_file or args.train_data_dir
    fmt = "faceid6m" if args.train_data_dir and args.data_format == "auto" else args.data_format
    records, bad = load_checked_records(
        path, fmt, args.data_root_path, args.person_id_from_folder, args.skip_bad_samples, logger=log
    )
    # issue 21: persons held out of training for identity validation (faceid/train/monitor.py)
    held_out = []
    if getattr(args, "validation_persons", 0) and args.validation_steps and not args.validation_index:
        from faceid.train.monitor import split_persons

        records, held_out = split_persons(records, args.validation_persons, args.seed)
    buckets = scaled_buckets(args.resolution, args.bucket_multiple) if args.aspect_ratio_buckets else None
    source = {"kind": "index", "path": os.path.abspath(path), "items": len(records)}
    cache = open_disk_cache(
        args, enc, source, buckets, [r.key for r in records], [r.caption for r in records]
    )
    ds = FaceTrainDataset(records, tokenizers, buckets=buckets, disk_cache=cache, **common)
    sampler = EpochBatchSampler(ds.bucket_groups(), args.train_batch_size, args.seed, rank, world)

    def factory(epoch, start):
        sampler.set_epoch(epoch, start)
        return torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate, persistent_workers=False
        )

    ds.num_bad = len(bad)
    ds.held_out = held_out
    return ds, records, factory, sampler.num_batches()


def check_args(args) -> None:
    """Flag combinations argparse cannot express; a bad one is a :class:`TrainingInputError` naming the flags."""
    from faceid.train.errors import TrainingInputError

    sources = [x for x in (args.data_json_file, args.train_data_dir, args.train_shards) if x]
    if len(sources) != 1:
        raise TrainingInputError("give exactly one of --data_json_file, --train_data_dir, --train_shards")
    if not os.path.exists(sources[0]):
        raise TrainingInputError(f"{sources[0]}: no such file or folder (check the data flag)")
    if args.cache_latents and (args.random_crop or args.random_flip > 0):
        raise TrainingInputError(
            "--cache_latents needs a deterministic view: drop --random_crop/--random_flip"
        )
    if args.train_shards and (args.cache_latents or args.aspect_ratio_buckets):
        raise TrainingInputError(
            "--train_shards streams fixed-size samples: no --cache_latents/--aspect_ratio_buckets"
        )
    if args.precomputed_cache:
        if args.random_crop:
            raise TrainingInputError(
                "--precomputed_cache holds the centre crop of each bucket: drop --random_crop (or train without it)"
            )
        if args.cache_latents or args.cache_text_embeddings:
            raise TrainingInputError(
                "--precomputed_cache replaces --cache_latents/--cache_text_embeddings: drop them"
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


def make_optimizer(args, params, accum: int, world: int, max_steps: int):
    """AdamW (or bitsandbytes' 8-bit AdamW) and the learning-rate schedule."""
    import torch
    from diffusers.optimization import get_scheduler

    from faceid.train.errors import TrainingInputError

    lr = args.learning_rate
    if args.scale_lr:
        lr *= accum * args.train_batch_size * world
    opt_cls = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TrainingInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from exc
        opt_cls = bnb.optim.AdamW8bit
    optimizer = opt_cls(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process: count steps × processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=max_steps * world,
    )
    return optimizer, lr_scheduler


def log_validation(parts, model, items, prompts, args, step, accelerator):
    """Generate one image per (face, prompt) with the InstantID pipeline and the weights being trained; save the
    grid to ``OUTPUT/validation/step-N.png`` and send it to the trackers. Returns the grid's path."""
    import torch

    with torch.no_grad():
        return _log_validation(parts, model, items, prompts, args, step, accelerator)


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


def monitor_generate(parts, model, args, accelerator, requests):
    """Identity validation's images (faceid/train/monitor.py): one per (embedding, keypoint image, prompt, seed)."""
    import torch

    was_training = [m.training for m in (model.controlnet, model.image_proj)]
    model.eval()
    pipe, images = validation_pipeline(parts, model), []
    with torch.no_grad():
        for emb, kps, prompt, seed in requests:
            g = torch.Generator(device=accelerator.device).manual_seed(seed)
            with accelerator.autocast():
                images.append(pipe(prompt, image_embeds=emb, image=kps, height=kps.size[1], width=kps.size[0],
                                   num_inference_steps=args.validation_steps_count,
                                   guidance_scale=args.validation_guidance_scale, generator=g).images[0])  # fmt: skip
    model.controlnet.train(was_training[0])
    model.image_proj.train(was_training[1])
    return images


def _log_validation(parts, model, items, prompts, args, step, accelerator):
    import numpy as np
    import torch
    from PIL import Image

    was_training = [m.training for m in (model.controlnet, model.image_proj)]
    model.eval()
    pipe = validation_pipeline(parts, model)
    rows = []
    for emb, kps in items:
        row = []
        for prompt in prompts:
            # The same seed every time: grids of successive steps differ only by the weights.
            g = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
            with accelerator.autocast():
                img = pipe(
                    prompt,
                    image_embeds=emb,
                    image=kps,
                    height=kps.size[1],
                    width=kps.size[0],
                    num_inference_steps=args.validation_steps_count,
                    guidance_scale=args.validation_guidance_scale,
                    generator=g,
                ).images[0]
            row.append(img)
        rows.append(row)
    del pipe
    model.controlnet.train(was_training[0])
    model.image_proj.train(was_training[1])
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (c * w, r * h))
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


def main(args):
    import torch
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DistributedType, ProjectConfiguration
    from tqdm.auto import tqdm

    import faceid.train.model as training  # module attribute access: tests patch training.compute_loss
    from faceid.train import checkpoints as ckpt
    from faceid.train.ema import EMA
    from faceid.train.errors import TrainingInputError
    from faceid.train.monitor import TrainingMonitor

    check_args(args)

    # 1. Accelerator and logging
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
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log = get_logger("train_instantid")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    # Frozen weights run in the mixed-precision dtype; trained weights stay fp32 (their updates are tiny).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. Models: frozen SDXL (VAE, text encoders, UNet), trained IdentityNet, Resampler and IP layers
    parts = training.load_components(args, weight_dtype, accelerator.device)
    model = parts["model"]
    if args.id_loss_weight > 0:
        # Frozen recognizer (the ONNX run by torch); only the face region is decoded, see faceid/train/identity.py.
        from faceid.train.identity import IdentityLoss

        parts["id_loss"] = IdentityLoss(
            args.id_loss_recognizer, args.id_loss_max_timestep, args.id_loss_margin, accelerator.device
        )

    # 3. Data: every rank reads its own deterministic share (a function of seed, epoch, batch)
    ds, records, make_loader, batches_per_epoch = build_data(
        args, (parts["tokenizer"], parts["tokenizer_2"]), rank, world, log, enc=parts
    )
    accum = max(1, args.gradient_accumulation_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accum > 1:
        raise TrainingInputError(
            "with DeepSpeed set gradient_accumulation_steps in its config and pass --gradient_accumulation_steps 1"
        )
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)

    # 4. Optimizer and learning-rate schedule, over the trained parameters only
    params = training.trainable_parameters(model)
    optimizer, lr_scheduler = make_optimizer(args, params, accum, world, max_steps)

    # 5. Prepare for the launch setup, then resume: checkpoints hold the trained weights in the official layout
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ckpt.register_hooks(accelerator, accelerator.unwrap_model)
    parts["model"] = model
    unwrapped = accelerator.unwrap_model(model)
    # The average starts from the weights training starts with (resume replaces it with the saved one).
    ema = EMA(unwrapped, args.ema_decay) if args.use_ema else None
    global_step = resume(args, accelerator, log, batches_per_epoch, accum, world, unwrapped, ema)
    first_epoch, start_update = divmod(global_step, updates_per_epoch)

    # 6. Trackers, the run's arguments, validation faces
    if accelerator.is_main_process:
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
    val_items, val_prompts = [], args.validation_prompt or list(VALIDATION_PROMPTS)
    if args.validation_steps and accelerator.is_main_process:
        if records:
            val_items = training.validation_items(records, args.resolution, args.num_validation_faces)
        else:
            log.warning("validation uses faces from an index; with --train_shards it is skipped")
    log.info(
        f"{len(ds)} items, {batches_per_epoch} batches/epoch/process, {world} processes, {max_steps} steps, "
        f"{num_epochs} epochs; starting at step {global_step}"
    )

    # 7. Training loop
    cache = training.CondCache(args.cache_latents, args.cache_text_embeddings)
    bar = tqdm(
        range(max_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    logs_out = StepLogs(args, rank, accelerator)
    nonfinite_in_a_row = 0
    # issue 21: identity validation on held-out persons and the collapse probe (faceid/train/monitor.py)
    monitor = None
    if accelerator.is_main_process and TrainingMonitor.wanted(args):
        monitor = TrainingMonitor(
            args, parts, unwrapped, records, getattr(ds, "held_out", []), weight_dtype, accelerator.device,
            logs_out.scalars, lambda reqs: monitor_generate(parts, unwrapped, args, accelerator, reqs), log,
            accelerator.autocast,
        )  # fmt: skip
        if global_step == 0:
            monitor.at_step(0)  # the start values (a resumed run reads them from train_log.jsonl)

    def trainer_state(step):
        # What resume compares with the new run's setup (a change breaks the exact data order).
        return {"global_step": step, "epoch": step // updates_per_epoch, "batches_per_epoch": batches_per_epoch,
                "gradient_accumulation_steps": accum, "world_size": world, "seed": args.seed}  # fmt: skip

    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_steps:
            break
        first_u = start_update if epoch == first_epoch else 0
        if args.cache_latents and hasattr(ds, "with_pixels"):
            # Once every posterior is cached the loader stops decoding images.
            ds.with_pixels = len(cache.latents) < len(ds)
        # Resuming mid-epoch: the loader starts at the first unseen batch, without loading the ones before.
        loader = iter(make_loader(epoch, first_u * accum))
        for u in range(first_u, updates_per_epoch):
            n_micro = min(accum, batches_per_epoch - u * accum)
            t_step, data_time, bad, losses, step_samples = time.perf_counter(), 0.0, False, [], []
            id_sum, id_count = 0.0, 0
            phase = dict.fromkeys(("vae_time", "text_time", "fwd_bwd_time", "optimizer_time"), 0.0)
            for m in range(n_micro):
                t0 = time.perf_counter()
                batch = next(loader)
                data_time += time.perf_counter() - t0
                # Noise and timesteps depend on (seed, micro-step, rank) only: a resumed run draws the same.
                micro = (epoch * batches_per_epoch) + u * accum + m
                gen = training.micro_generator(args.seed, micro, rank, accelerator.device)
                stats = {"timing": args.log_phase_times}
                t0 = training.phase_clock(accelerator.device, stats)
                with accelerator.autocast():
                    loss = training.compute_loss(batch, parts, args, gen, weight_dtype, cache, stats=stats)
                if "id_loss" in stats:
                    id_sum += float(stats["id_loss"]) * stats["id_count"]
                    id_count += stats["id_count"]
                # Every rank must agree to skip, or DDP's all-reduce in backward would hang.
                flag = accelerator.reduce(
                    torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=accelerator.device), "max"
                )
                if flag.item() > 0 or bad:
                    bad = True
                    continue
                losses.append(loss.detach())
                # Gradients are all-reduced once per update, on its last micro-batch.
                sync = m == n_micro - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    accelerator.backward(loss / n_micro)
                if t0 is not None:
                    for k in ("vae_time", "text_time"):
                        phase[k] += stats.get(k, 0.0)
                    t1 = training.phase_clock(accelerator.device, stats)
                    phase["fwd_bwd_time"] += (
                        t1 - t0 - stats.get("vae_time", 0.0) - stats.get("text_time", 0.0)
                    )
                step_samples.append({"index": list(batch["index"]), "ref_index": list(batch["ref_index"])})
            grad_norm = None
            if bad:
                # One bad batch (a NaN from fp16 overflow, a broken sample) should not end a long run; many should.
                nonfinite_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning(
                    f"step {global_step + 1}: non-finite loss; step skipped ({nonfinite_in_a_row} in a row)"
                )
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{nonfinite_in_a_row} non-finite losses in a row; stopping (lower the learning rate, "
                        "use bf16 or an fp16-safe VAE, or check the data)"
                    )
            else:
                nonfinite_in_a_row = 0
                t0 = training.phase_clock(accelerator.device, {"timing": args.log_phase_times})
                if args.max_grad_norm and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(unwrapped)
                if t0 is not None:
                    phase["optimizer_time"] = training.phase_clock(accelerator.device, {"timing": True}) - t0
            global_step += 1
            bar.update(1)
            logs_out.samples(global_step, None if bad else losses, step_samples)
            if not bad:
                step_time = time.perf_counter() - t_step
                mean_loss = accelerator.gather(torch.stack(losses).mean().reshape(1)).mean().item()
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "data_time": data_time,
                        "step_time": step_time,
                        "samples_per_sec": n_micro * args.train_batch_size * world / max(step_time, 1e-9)}  # fmt: skip
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                if args.log_phase_times:
                    logs.update(phase)
                if args.id_loss_weight > 0:
                    # Logged apart: the mean over the samples it applied to, on all processes.
                    pair = torch.tensor([[id_sum, id_count]], device=accelerator.device)
                    s, c = accelerator.gather(pair).sum(0)
                    if c > 0:
                        logs["id_loss"] = float(s / c)
                logs_out.scalars(global_step, logs)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                path = ckpt.save_checkpoint(
                    accelerator,
                    args.output_dir,
                    global_step,
                    trainer_state(global_step),
                    args.checkpoints_total_limit,
                    write_extra=ema.save if ema is not None else None,
                )
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
            if global_step >= max_steps:
                break
            if args.stop_after_steps and global_step >= args.stop_after_steps:
                log.warning(f"--stop_after_steps: stopping at step {global_step} without final export")
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
    accelerator.end_training()
    return SimpleNamespace(global_step=global_step, model=unwrapped, parts=parts, completed=True)


def resume(args, accelerator, log, batches_per_epoch: int, accum: int, world: int, model, ema=None) -> int:
    """Load the checkpoint ``--resume_from_checkpoint`` names (if any) and return its global step."""
    from faceid.train import checkpoints as ckpt

    path = ckpt.resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and path is None:
        log.info(f"No complete checkpoint in {args.output_dir}; starting a new run")
    if path is None:
        return 0
    log.info(f"Resuming from {path}")
    accelerator.load_state(str(path))
    if ema is not None and not ema.load(path):
        log.warning(f"{path} holds no EMA: the average starts from the resumed weights")
        ema.reset(model)
    state = ckpt.read_state(path)
    now = {"batches_per_epoch": batches_per_epoch, "gradient_accumulation_steps": accum, "world_size": world}
    changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) not in (None, v)}
    if changed:
        log.warning(f"resuming with a different setup {changed}: the data order will not continue exactly")
    return int(state["global_step"])


class StepLogs:
    """``train_log.jsonl`` + trackers (main process) and ``samples/rank-R.jsonl`` (each process)."""

    def __init__(self, args, rank: int, accelerator):
        self.accelerator = accelerator
        self.train_log = os.path.join(args.output_dir, "train_log.jsonl")
        self.sample_log = (
            os.path.join(args.output_dir, "samples", f"rank-{rank}.jsonl") if args.log_samples else None
        )
        self.rank = rank
        if self.sample_log:
            os.makedirs(os.path.dirname(self.sample_log), exist_ok=True)

    def samples(self, step: int, losses, batches) -> None:
        if not self.sample_log:
            return
        import torch

        local = None if losses is None else float(torch.stack(losses).mean())
        entry = {"step": step, "rank": self.rank, "loss": local, "batches": batches}
        with open(self.sample_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def scalars(self, step: int, logs: dict) -> None:
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            with open(self.train_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
