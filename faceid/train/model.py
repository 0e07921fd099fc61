"""Model setup, the loss and the validation faces for ``train_instantId_sdxl.py`` (which generates the
validation grid itself: packages never import the top-level pipeline script).

The trained module is :class:`TrainModel`: Resampler (face embedding → face tokens) + the SDXL UNet with
InstantID attention processors + IdentityNet. The UNet sees ``cat([text tokens, face tokens])``; IdentityNet sees
the face tokens only, the keypoint image and the same SDXL micro-conditioning.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from faceid.schema import EMBEDDING_DIM

logger = logging.getLogger(__name__)


class TrainModel(nn.Module):
    def __init__(self, unet, controlnet, image_proj):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.image_proj = image_proj
        # What forward runs instead of a module, by name: its compiled forward (--compile, faceid/train/speed.py).
        # A plain dict is not part of the module tree: state-dict keys, DDP and validation see the modules.
        self.forwards = {}
        self.channels_last = False  # --channels_last: the image-shaped inputs in that format too

    def forward(self, noisy_latents, timesteps, prompt_embeds, added_cond_kwargs, face_embeds, kps_image):
        face_tokens = self.image_proj(face_embeds.to(self.image_proj.proj_in.weight.dtype))
        face_tokens = face_tokens.to(prompt_embeds.dtype)
        if self.channels_last:
            noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
            kps_image = kps_image.contiguous(memory_format=torch.channels_last)
        # One parameter's dtype: diffusers' ``ModelMixin.dtype`` walks every submodule on each access.
        cn_dtype = self.controlnet.conv_in.weight.dtype
        down, mid = self.forwards.get("controlnet", self.controlnet)(
            noisy_latents.to(cn_dtype),
            timesteps,
            encoder_hidden_states=face_tokens.to(cn_dtype),
            added_cond_kwargs={k: v.to(cn_dtype) for k, v in added_cond_kwargs.items()},
            controlnet_cond=kps_image.to(cn_dtype),
            return_dict=False,
        )
        return self.forwards.get("unet", self.unet)(
            noisy_latents,
            timesteps,
            encoder_hidden_states=torch.cat([prompt_embeds, face_tokens], dim=1),
            added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=[d.to(noisy_latents.dtype) for d in down],
            mid_block_additional_residual=mid.to(noisy_latents.dtype),
        ).sample


def trainable_parameters(model: TrainModel):
    return [p for p in model.parameters() if p.requires_grad]


def load_components(args, weight_dtype, device):
    """Everything from the SDXL folder / hub id, IdentityNet, the face adapter. Trained parts stay fp32."""
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from faceid.train import speed
    from faceid.weight_files import check_pipeline_inputs
    from ip_adapter.resampler import Resampler
    from ip_adapter.weights import (
        build_resampler,
        install_ip_processors,
        ip_modules,
        load_ip_layers,
        read_adapter,
    )

    base, rev = args.pretrained_model_name_or_path, args.revision
    check_pipeline_inputs(None, [args.controlnet_model_name_or_path], args.pretrained_ip_adapter_path)
    enc = load_encoders(args, weight_dtype, device)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=rev)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=rev)
    if args.controlnet_model_name_or_path:
        controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
    else:
        logger.info("Initialising IdentityNet from the UNet")
        controlnet = ControlNetModel.from_unet(unet)
    if args.pretrained_ip_adapter_path:
        image_proj_sd, ip_sd = read_adapter(args.pretrained_ip_adapter_path)
        image_proj = build_resampler(image_proj_sd)
        install_ip_processors(unet, num_tokens=image_proj.num_queries, scale=1.0, init_from_unet=False)
        load_ip_layers(unet, ip_sd, what=f"{args.pretrained_ip_adapter_path} ip_adapter weights")
    else:
        image_proj = Resampler(
            dim=args.resampler_dim,
            depth=args.resampler_depth,
            dim_head=args.resampler_dim_head,
            heads=args.resampler_heads,
            num_queries=args.num_tokens,
            embedding_dim=EMBEDDING_DIM,
            output_dim=unet.config.cross_attention_dim,
            ff_mult=args.resampler_ff_mult,
        )
        install_ip_processors(unet, num_tokens=args.num_tokens, scale=1.0, init_from_unet=True)

    for m in (unet, controlnet, image_proj):
        m.requires_grad_(False)
    ip_layers = ip_modules(unet)
    # Frozen weights in weight_dtype, trained ones fp32.
    unet.to(device, dtype=weight_dtype)
    controlnet.to(device, dtype=torch.float32 if args.train_identitynet else weight_dtype)
    image_proj.to(device, dtype=torch.float32 if args.train_resampler else weight_dtype)
    ip_layers.to(device, dtype=torch.float32 if args.train_ip_layers else weight_dtype)
    if args.train_identitynet:
        controlnet.requires_grad_(True)
        controlnet.train()
    if args.train_resampler:
        image_proj.requires_grad_(True)
        image_proj.train()
    if args.train_ip_layers:
        ip_layers.requires_grad_(True)
    if not (args.train_identitynet or args.train_resampler or args.train_ip_layers):
        raise ValueError("nothing to train: enable at least one of IdentityNet, Resampler, IP layers")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    model = TrainModel(unet, controlnet, image_proj)
    speed.apply_flags(args, model, enc["vae"])  # --channels_last, --compile
    return dict(**enc, noise_scheduler=noise_scheduler, model=model)


def load_encoders(args, weight_dtype, device) -> dict:
    """The frozen encoders (tokenizers, both text encoders, VAE) as training uses them: text encoders in
    ``weight_dtype``, the VAE in fp32 unless an fp16-safe VAE is given. ``precompute_cache.py`` loads the same."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from faceid.weight_files import check_pipeline_inputs

    base, rev = args.pretrained_model_name_or_path, args.revision
    check_pipeline_inputs(base, vae=args.pretrained_vae_model_name_or_path)  # truncated / wrong kind: named
    tok = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=rev, use_fast=False)
    tok2 = AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=rev, use_fast=False)
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=rev)
    te2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", revision=rev)
    vae_path = args.pretrained_vae_model_name_or_path
    vae = AutoencoderKL.from_pretrained(vae_path or base, subfolder=None if vae_path else "vae", revision=rev)
    vae_dtype = weight_dtype if (vae_path and args.vae_in_weight_dtype) else torch.float32
    for m, dtype in ((vae, vae_dtype), (te, weight_dtype), (te2, weight_dtype)):
        m.requires_grad_(False)
        m.to(device, dtype=dtype)
        m.eval()
    return dict(tokenizer=tok, tokenizer_2=tok2, text_encoder=te, text_encoder_2=te2, vae=vae)


# The encoders run one sample at a time: CPU (and GPU) kernels give batch-size-dependent low bits, and one sample
# at a time is what makes a precomputed cache (``precompute_cache.py``) bit-identical to encoding on the fly. At
# SDXL's per-GPU batch of 1-4 this costs little.


@torch.no_grad()
def encode_text(text_encoders, input_ids_list):
    """SDXL text conditioning: penultimate hidden states of both encoders concatenated, pooled from the 2nd."""
    rows = []
    for b in range(input_ids_list[0].shape[0]):
        embeds, pooled = [], None
        for enc, ids in zip(text_encoders, input_ids_list):
            out = enc(ids[b : b + 1].to(enc.device), output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        rows.append((torch.cat(embeds, dim=-1), pooled))
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


@torch.no_grad()
def encode_latent_params(vae, pixel_values) -> torch.Tensor:
    """The VAE posterior's (mean, logvar) stacked along channels: what the latent caches store."""
    x = pixel_values.to(vae.device, dtype=vae.dtype)
    return torch.cat([vae.encode(x[b : b + 1]).latent_dist.parameters.float() for b in range(x.shape[0])])


def sample_latents(params: torch.Tensor, vae, generator) -> torch.Tensor:
    mean, logvar = torch.chunk(params, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def micro_generator(seed: int, micro_step: int, rank: int, device) -> torch.Generator:
    """The noise/timestep generator of one micro-batch: a function of (seed, micro-step, rank) only, so a
    resumed run draws exactly what the uninterrupted run drew."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(micro_step) * 9_176 + int(rank) * 7_919_001) % (2**63 - 1))
    return g


class CondCache:
    """In-memory cache of VAE posteriors (by item index) and text embeddings (by caption)."""

    def __init__(self, latents: bool, text: bool):
        self.use_latents, self.use_text = latents, text
        self.latents: dict[int, torch.Tensor] = {}
        self.text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def phase_clock(device, stats) -> float | None:
    """``time.perf_counter()`` after the device finished its queued work, when ``stats["timing"]`` asks for phase
    times (``--log_phase_times``: the synchronisation costs a little on GPUs), else ``None``."""
    if stats is None or not stats.get("timing"):
        return None
    import time

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def compute_loss(batch, parts, args, generator, weight_dtype, cache: CondCache | None = None, stats=None):
    """One micro-batch: encode, noise, predict, MSE (optionally min-SNR weighted), plus the identity loss when
    ``parts["id_loss"]`` is set and ``--id_loss_weight`` > 0. Returns the loss; ``stats`` (a dict) receives
    ``mse`` and, when applied, ``id_loss`` and ``id_count`` (samples under the timestep threshold); with
    ``stats["timing"]`` also ``vae_time``/``text_time`` (seconds spent encoding, absent when read from a cache)."""
    from diffusers.training_utils import compute_snr

    from faceid.train.transforms import cond_to_float, pixels_to_float

    vae, sched, model = parts["vae"], parts["noise_scheduler"], parts["model"]
    device = generator.device
    idx = batch["index"]
    if "latent_params" in batch:  # from the disk cache
        params = batch["latent_params"].to(device)
    elif cache is not None and cache.use_latents and all(i in cache.latents for i in idx):
        params = torch.stack([cache.latents[i] for i in idx]).to(device)
    else:
        t0 = phase_clock(device, stats)
        params = encode_latent_params(vae, pixels_to_float(batch["pixel_values"].to(device)))
        if t0 is not None:
            stats["vae_time"] = phase_clock(device, stats) - t0
        if cache is not None and cache.use_latents:
            for i, p in zip(idx, params.cpu()):
                cache.latents[i] = p
    latents = sample_latents(params.to(device), vae, generator).to(weight_dtype)
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), generator=generator, device=device, dtype=torch.float32
        )
    noise = noise.to(weight_dtype)
    timesteps = torch.randint(
        0, sched.config.num_train_timesteps, (bsz,), generator=generator, device=device, dtype=torch.long
    )
    noisy = sched.add_noise(latents, noise, timesteps)

    captions = batch["caption"]
    if "prompt_embeds" in batch:  # from the disk cache
        prompt_embeds, pooled = batch["prompt_embeds"].to(device), batch["pooled_prompt_embeds"].to(device)
    elif cache is not None and cache.use_text and all(c in cache.text for c in captions):
        prompt_embeds = torch.stack([cache.text[c][0] for c in captions]).to(device)
        pooled = torch.stack([cache.text[c][1] for c in captions]).to(device)
    else:
        t0 = phase_clock(device, stats)
        prompt_embeds, pooled = encode_text(
            [parts["text_encoder"], parts["text_encoder_2"]], [batch["input_ids"], batch["input_ids_2"]]
        )
        if cache is not None and cache.use_text:
            for c, e, p in zip(captions, prompt_embeds.cpu(), pooled.cpu()):
                cache.text[c] = (e, p)
        if t0 is not None:
            stats["text_time"] = phase_clock(device, stats) - t0
    if getattr(args, "text_drop_zeros", False) and "drop_text" in batch:
        # SDXL learned its unconditional input as zero embeddings (its pipeline's force_zeros_for_empty_prompt
        # feeds CFG zeros, not the encoded ""): a dropped caption trains that input. The encoded "" is an input
        # the frozen UNet never saw; the adapter then spends its steps compensating it and stops using the face
        # (docs/miniature.md).
        keep = 1.0 - torch.tensor(batch["drop_text"], dtype=prompt_embeds.dtype, device=prompt_embeds.device)
        prompt_embeds = prompt_embeds * keep[:, None, None]
        pooled = pooled * keep[:, None].to(pooled)
    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
    added = {"text_embeds": pooled.to(device, weight_dtype), "time_ids": time_ids.to(device, weight_dtype)}
    pred = model(
        noisy,
        timesteps,
        prompt_embeds.to(device, weight_dtype),
        added,
        batch["face_embeds"].to(device),
        cond_to_float(batch["kps_image"].to(device)),
    )
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if args.snr_gamma is None:
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(sched, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma) / (
            snr + 1 if sched.config.prediction_type == "v_prediction" else snr
        )
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        loss = (loss * weights).mean()
    if stats is not None:
        stats["mse"] = loss.detach()
    id_loss = parts.get("id_loss")
    if id_loss is not None and getattr(args, "id_loss_weight", 0.0) > 0:
        value, count = id_loss(pred, noisy, timesteps, batch, sched, vae)
        if value is not None:
            loss = loss + args.id_loss_weight * value
            if stats is not None:
                stats["id_loss"], stats["id_count"] = value.detach(), count
    return loss


# ----------------------------------------------------------------------------------------------------------
# Validation


def validation_items(records, resolution: int, count: int):
    """(embedding, keypoints, size) for the first ``count`` records, centre-cropped to ``resolution`` as training
    crops them (the trainer's ``validation_request`` turns them into requests)."""
    from faceid.train.records import load_embedding
    from faceid.train.transforms import plan_crop, transform_kps

    out = []
    for rec in records[:count]:
        plan = plan_crop(rec.width, rec.height, (resolution, resolution))
        out.append((load_embedding(rec.embedding), transform_kps(rec.kps, plan), plan.target))
    return out
