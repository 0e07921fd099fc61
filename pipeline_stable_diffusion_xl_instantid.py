"""InstantID pipeline for SDXL: IdentityNet (a ControlNet fed face tokens + a keypoint image) and an IP-Adapter.

Official API (``load_ip_adapter_instantid``, ``set_ip_adapter_scale``, ``__call__(prompt, image_embeds=...,
image=kps_image, controlnet_conditioning_scale=...)``) plus:

* ``ip_adapter_scale`` per call, ``control_mask`` (IdentityNet residuals and face attention only inside a region);
* multi-ControlNet: IdentityNet first and fed the face tokens, the others get the text tokens as usual;
* several reference faces for one identity (``image_embeds`` of shape ``[N, 512]`` are averaged);
* batched ``num_images_per_prompt`` and any scheduler (LCM included);
* img2img and inpainting (``init_image``, ``mask_image``, ``strength``; ``image`` stays the keypoint image as in
  the official call) and :func:`face_inpaint` / :func:`face_detail` (a face into an existing photo, pasted back);
* several people (``faces=[{"image_embeds", "image", "mask"}, ...]``, see :func:`people_inputs`): each face's
  IdentityNet residuals and face tokens act only inside its own region;
* prompt weighting ``(word:1.2)`` and prompts longer than 77 tokens for both text encoders (plain prompts go
  through diffusers' ``encode_prompt`` unchanged);
* the face Resampler is a pipeline component (``image_proj_model``): it follows ``pipe.to(...)``, the official
  ``pipe.cuda(dtype, use_xformers)``, CPU offload, and ``save_pretrained``/``from_pretrained``;
* helpers for the CLI and apps: :func:`pose_from_image`, :func:`load_loras`, :func:`unload_loras`,
  :func:`apply_memory_options`.

The face tokens are computed once per call; the classifier-free-guidance negative for the face is the Resampler
applied to a zero embedding, as the official weights expect.

Run as a script for a quick offline check on the tiny weights: ``python pipeline_stable_diffusion_xl_instantid.py
--tiny tiny``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from faceid.face.kps import draw_kps, fit_size, resize_img  # noqa: F401  (re-exported: the official module has both)
from faceid.face.regions import crop_box, feathered_mask, kps_from_bbox, left_to_right, region_masks
from faceid.generation.prompts import parse_weights, uses_weights
from ip_adapter.attention_processor import AttnProcessor, IPAttnProcessor
from ip_adapter.weights import (
    build_resampler,
    install_ip_processors,
    ip_layers_state,
    load_ip_layers,
    read_adapter,
    write_adapter,
)

logger = logging.getLogger(__name__)

# Quick-check defaults (edit here or pass flags).
TINY_DIR = "tiny"
PROMPT = "a photo of a person, best quality"
# Written by save_pretrained beside the diffusers folders (official layout, loads in ComfyUI too).
ADAPTER_FILENAME = "ip-adapter.safetensors"
CUDA_DEVICE = "cuda"  # what pipe.cuda() moves to (tests point it at the CPU)


def face_embedding_tensor(image_embeds, dim: int) -> torch.Tensor:
    """Embeddings of one identity (``[dim]``, ``[N, dim]``, ``[1, N, dim]`` or a list) → ``[1, dim]`` mean."""
    if isinstance(image_embeds, (list, tuple)):
        image_embeds = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in image_embeds])
    t = torch.as_tensor(np.asarray(image_embeds) if not torch.is_tensor(image_embeds) else image_embeds)
    t = t.detach().float().reshape(-1, t.shape[-1])
    if t.shape[-1] != dim:
        raise ValueError(f"face embedding has size {t.shape[-1]}, the adapter expects {dim}")
    return t.mean(dim=0, keepdim=True)


def mask_tensor(control_mask, height: int, width: int, mode: str = "nearest") -> torch.Tensor:
    """PIL / array / tensor mask → float ``[1, 1, H, W]`` in 0..1 at the output size."""
    if isinstance(control_mask, Image.Image):
        control_mask = np.asarray(control_mask.convert("L"), dtype=np.float32) / 255.0
    m = torch.as_tensor(
        np.asarray(control_mask) if not torch.is_tensor(control_mask) else control_mask
    ).float()
    if m.ndim == 3 and m.shape[-1] in (1, 3):  # HWC
        m = m[..., 0]
    m = m.reshape(1, 1, *m.shape[-2:])
    if m.max() > 1:
        m = m / 255.0
    if tuple(m.shape[-2:]) == (height, width):
        return m
    return F.interpolate(m, size=(height, width), mode=mode)


def _as_output(processor, images: torch.Tensor, output_type: str):
    """``[B, 3, H, W]`` in 0..1 → the requested output type."""
    if output_type == "pt":
        return images
    arr = processor.pt_to_numpy(images)
    return arr if output_type == "np" else processor.numpy_to_pil(arr)


def _token_ids(tokenizer, text: str) -> list[int]:
    """Token ids without BOS/EOS, with no length limit (and without transformers' too-long warning)."""
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) if text else []


def _token_count(tokenizer, text: str) -> int:
    return len(_token_ids(tokenizer, text))


def _weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """Token ids of ``text`` without the syntax, and each token's weight."""
    ids, weights = [], []
    for piece, weight in parse_weights(text):
        piece_ids = _token_ids(tokenizer, piece)
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def _encode_windows(tokenizer, encoder, ids, weights, windows: int, device, clip_skip):
    """``windows`` CLIP windows of ``[BOS] 75 tokens [EOS] pad`` → (hidden ``[1, 77*windows, D]``, pooled of the
    first window or None for an encoder without projection)."""
    size = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hidden, pooled = [], None
    for w in range(windows):
        chunk, chunk_w = ids[w * size : (w + 1) * size], weights[w * size : (w + 1) * size]
        filler = size - len(chunk)
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [pad] * filler
        row_w = [1.0, *chunk_w, 1.0] + [1.0] * filler
        out = encoder(torch.tensor([row], device=device), output_hidden_states=True)
        h = out.hidden_states[-2] if clip_skip is None else out.hidden_states[-(clip_skip + 2)]
        if any(x != 1.0 for x in row_w):
            h = h * torch.tensor(row_w, device=h.device, dtype=h.dtype)[None, :, None]
        hidden.append(h)
        if w == 0 and out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
            pooled = out[0]
    return torch.cat(hidden, dim=1), pooled


def _per_net(value, count: int) -> list:
    """A per-ControlNet argument as a list (a single value applies to every net)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class _ResidualMask:
    """Multiplies IdentityNet residuals by the region mask resized (once per resolution) to their grid."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask
        self.sized: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        key = tuple(t.shape[-2:])
        if key not in self.sized:
            self.sized[key] = F.interpolate(self.mask, size=key, mode="nearest").to(t.dtype)
        return t * self.sized[key]


class StableDiffusionXLInstantIDPipeline(StableDiffusionXLControlNetPipeline):
    image_proj_model_in_features = 512
    _callback_tensor_inputs = ["latents", "prompt_embeds", "face_tokens"]
    # The Resampler is a component: pipe.to(), offload hooks and save/load see it. IdentityNet stays out of the
    # offload chain (it runs interleaved with the UNet), as in diffusers' ControlNet pipelines.
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->image_proj_model->unet->vae"
    _optional_components = [*StableDiffusionXLControlNetPipeline._optional_components, "image_proj_model"]

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        controlnet,
        scheduler,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor=None,
        image_encoder=None,
        image_proj_model=None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_modules(image_proj_model=image_proj_model)

    # ---- devices, dtypes, saving ---------------------------------------------------------------
    def cuda(self, dtype=torch.float16, use_xformers: bool = False, device: str | torch.device | None = None):
        """The official pipeline's ``pipe.cuda()``: every component (the Resampler included) to ``device``/``dtype``.

        ``use_xformers`` is accepted for the official scripts; the attention processors here use PyTorch's
        ``scaled_dot_product_attention``, which has the same memory profile, so nothing is swapped (xformers'
        processors would drop the face tokens)."""
        self.to(device or CUDA_DEVICE, dtype)
        if self.image_proj_model is not None:
            self.image_proj_model.to(self.unet.device, self.unet.dtype)
        if use_xformers:
            logger.info("use_xformers: SDPA attention is already memory-efficient; processors kept")
        return self

    def save_pretrained(self, save_directory, **kwargs):
        """The diffusers folders (UNet saved with its own attention processors, so any SDXL code loads it) plus
        the face adapter as ``ip-adapter.safetensors`` in the official layout; :meth:`from_pretrained` reads both."""
        resampler = self.image_proj_model
        procs = dict(self.unet.attn_processors)
        has_ip = any(isinstance(p, IPAttnProcessor) for p in procs.values())
        ip_state = ip_layers_state(self.unet) if has_ip else None
        if has_ip:
            self.unet.set_attn_processor(AttnProcessor())
        entry = self.config.get("image_proj_model")
        self.register_to_config(image_proj_model=(None, None))
        try:
            super().save_pretrained(save_directory, **kwargs)
            __import__("faceid.files").files.apply_umask(save_directory)  # safetensors writes 0600
        finally:
            self.register_to_config(image_proj_model=entry)
            if has_ip:
                self.unet.set_attn_processor(procs)
        if resampler is not None and ip_state is not None:
            write_adapter(Path(save_directory) / ADAPTER_FILENAME, resampler, ip_state)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; a folder written by :meth:`save_pretrained` also gets its face adapter back."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        adapter = Path(os.fspath(pretrained_model_name_or_path)) / ADAPTER_FILENAME
        if adapter.is_file():
            pipe.load_ip_adapter_instantid(adapter)
        return pipe

    # ---- adapter -------------------------------------------------------------------------------
    def load_ip_adapter_instantid(
        self, model_ckpt, image_emb_dim: int = 512, num_tokens: int | None = None, scale=0.5
    ):
        """Load an ``ip-adapter.bin``/``.safetensors`` (official layout; sizes are read from the checkpoint)."""
        image_proj, ip_layers = read_adapter(model_ckpt)
        device = self.unet.device if self.unet.device.type != "meta" else torch.device("cpu")
        resampler = build_resampler(image_proj, dtype=self.unet.dtype, device=device).eval()
        if resampler.embedding_dim != image_emb_dim:
            raise ValueError(
                f"{model_ckpt}: Resampler takes {resampler.embedding_dim}-d embeddings, not {image_emb_dim}"
            )
        if num_tokens is not None and num_tokens != resampler.num_queries:
            raise ValueError(
                f"{model_ckpt}: the checkpoint has {resampler.num_queries} face tokens, not {num_tokens}"
            )
        self.register_modules(image_proj_model=resampler)
        self.image_proj_model_in_features = image_emb_dim
        install_ip_processors(self.unet, num_tokens=resampler.num_queries, scale=scale, init_from_unet=False)
        load_ip_layers(self.unet, ip_layers, what=f"{model_ckpt} ip_adapter weights")
        # Same maths as diffusers' default, plus keys/values of the (constant) face tokens computed once per call.
        for net in self._controlnets():
            if all(type(p).__name__ == "AttnProcessor2_0" for p in net.attn_processors.values()):
                net.set_attn_processor(AttnProcessor())

    def _controlnets(self) -> list:
        return (
            list(self.controlnet.nets)
            if isinstance(self.controlnet, MultiControlNetModel)
            else [self.controlnet]
        )

    @staticmethod
    def _takes_kv_cache(model) -> bool:
        return all(isinstance(p, (AttnProcessor, IPAttnProcessor)) for p in model.attn_processors.values())

    def set_ip_adapter_scale(self, scale: float) -> None:
        for proc in self.unet.attn_processors.values():
            if isinstance(proc, IPAttnProcessor):
                proc.scale = scale

    def _ip_scale(self) -> float | None:
        for proc in self.unet.attn_processors.values():
            if isinstance(proc, IPAttnProcessor):
                return proc.scale
        return None

    def encode_face(self, image_embeds, batch: int, do_cfg: bool) -> torch.Tensor:
        """Face tokens for ``batch`` images (``[2*batch, T, D]`` with the zero-embedding negative first)."""
        if self.image_proj_model is None:
            raise RuntimeError("call load_ip_adapter_instantid(path) before generating")
        emb = face_embedding_tensor(image_embeds, self.image_proj_model_in_features)
        # The execution device: under CPU offload the Resampler's hook moves it there when it runs.
        emb = emb.to(self._execution_device, dtype=self.image_proj_model.proj_in.weight.dtype)
        if do_cfg:
            emb = torch.cat([torch.zeros_like(emb), emb])
        with torch.no_grad():
            tokens = self.image_proj_model(emb)
        return tokens.repeat_interleave(batch, dim=0).to(self._execution_device)

    # ---- generation ----------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        prompt_2,
        image_embeds,
        image,
        height,
        width,
        num_inference_steps,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        controlnet_conditioning_scale=1.0,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        num_images_per_prompt=1,
        callback_on_step_end_tensor_inputs=None,
        faces=None,
        init_image=None,
        mask_image=None,
        strength=1.0,
    ):
        """Raise ``ValueError`` naming the first argument that cannot work (before any model runs)."""
        nets = self._controlnets()
        if faces is not None:
            if not isinstance(faces, (list, tuple)) or not faces:
                raise ValueError("faces must be a non-empty list of dicts with image_embeds, image and mask")
            for i, face in enumerate(faces):
                if (
                    not isinstance(face, dict)
                    or face.get("image_embeds") is None
                    or face.get("image") is None
                ):
                    raise ValueError(f"faces[{i}] needs 'image_embeds' and 'image' (its keypoint image)")
            if image_embeds is not None or image is not None:
                raise ValueError("faces replaces image_embeds and image: pass one or the other")
            if len(nets) > 1:
                raise ValueError("faces (several people) works with IdentityNet alone, not extra ControlNets")
        else:
            if image_embeds is None:
                raise ValueError("image_embeds (the face embedding) is required")
            if image is None:
                raise ValueError("image (the keypoint image) is required")
            if len(nets) > 1 and not isinstance(image, (list, tuple)):
                raise ValueError(f"image: {len(nets)} ControlNets need {len(nets)} control images, got 1")
            if isinstance(image, (list, tuple)) and len(nets) > 1 and len(image) != len(nets):
                raise ValueError(f"{len(nets)} ControlNets need {len(nets)} control images, got {len(image)}")
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if mask_image is not None and init_image is None:
            raise ValueError("mask_image needs init_image (the photo to inpaint)")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt or prompt_embeds is required")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        for name, value in (("prompt", prompt), ("prompt_2", prompt_2)):
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{name} must be a string or a list of strings, not {type(value).__name__}")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds (SDXL's second text encoder output)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(
                f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}, "
                f"prompt_embeds {tuple(prompt_embeds.shape)}: they must match"
            )
        for name, value in (("height", height), ("width", width)):
            if value is not None and (int(value) <= 0 or int(value) % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if num_inference_steps is not None and int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        for name, value in (
            ("controlnet_conditioning_scale", controlnet_conditioning_scale),
            ("control_guidance_start", control_guidance_start),
            ("control_guidance_end", control_guidance_end),
        ):
            if isinstance(value, (list, tuple)) and len(value) != len(nets):
                raise ValueError(f"{name} has {len(value)} values for {len(nets)} ControlNets")
        starts = _per_net(control_guidance_start, len(nets))
        ends = _per_net(control_guidance_end, len(nets))
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(
                    f"control_guidance_start ({s}) must be below control_guidance_end ({e}), both in [0, 1]"
                )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
            if unknown:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs: {sorted(unknown)} not among "
                    f"{self._callback_tensor_inputs}"
                )

    # ---- prompt weighting ------------------------------------------------------------------------
    def _wants_weighting(self, *texts) -> bool:
        """Weighting syntax, or more tokens than one CLIP window holds, in any of ``texts`` (str or lists)."""
        flat = [t for x in texts if x is not None for t in ([x] if isinstance(x, str) else x)]
        if any(uses_weights(t) for t in flat):
            return True
        for tok in (self.tokenizer, self.tokenizer_2):
            if tok is not None and any(_token_count(tok, t) > tok.model_max_length - 2 for t in flat):
                return True
        return False

    def encode_weighted_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        negative_prompt_2=None,
        clip_skip: int | None = None,
    ):
        """``encode_prompt`` with ``(word:1.2)`` weights and no 77-token limit, for SDXL's two encoders.

        Each prompt is cut into windows of 75 tokens, each encoded as ``[BOS] window [EOS] padding`` exactly as
        diffusers encodes a short prompt, and the windows' hidden states are concatenated (the pooled embedding
        is the first window's). A token's hidden state is multiplied by its weight. Positive and negative prompts
        are padded with empty windows to the same length. Returns the same four tensors as ``encode_prompt``.
        """
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = prompt_2 or prompts
        prompts_2 = [prompts_2] * len(prompts) if isinstance(prompts_2, str) else list(prompts_2)
        pairs = [
            (tok, enc)
            for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        ]
        if any(tok is None or enc is None for tok, enc in pairs):
            raise ValueError("prompt weighting needs both SDXL tokenizers and text encoders")
        zero_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        rows = [list(zip(prompts, prompts_2))]
        if do_classifier_free_guidance and not zero_negative:
            neg = negative_prompt or ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            neg_2 = negative_prompt_2 or neg
            neg_2 = [neg_2] * len(prompts) if isinstance(neg_2, str) else list(neg_2)
            if len(neg) != len(prompts):
                raise ValueError(f"negative_prompt has {len(neg)} entries for {len(prompts)} prompts")
            rows.append(list(zip(neg, neg_2)))
        tokenized = [
            [[_weighted_tokens(tok, text) for (tok, _), text in zip(pairs, texts)] for texts in row]
            for row in rows
        ]
        window = self.tokenizer.model_max_length - 2
        windows = max(
            1, *(math.ceil(len(ids) / window) for row in tokenized for item in row for ids, _ in item)
        )
        out = []
        for row in tokenized:
            embeds, pooled = [], []
            for item in row:
                per_encoder = []
                for (tok, enc), (ids, weights) in zip(pairs, item):
                    hidden, pool = _encode_windows(tok, enc, ids, weights, windows, device, clip_skip)
                    per_encoder.append(hidden)
                    if pool is not None:
                        pooled.append(pool)
                embeds.append(torch.cat(per_encoder, dim=-1))
            out.append((torch.cat(embeds), torch.cat(pooled)))
        dtype = self.text_encoder_2.dtype
        prompt_embeds, pooled_prompt_embeds = out[0]
        if len(out) > 1:
            negative_prompt_embeds, negative_pooled_prompt_embeds = out[1]
        elif do_classifier_free_guidance:
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        else:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None

        def rep(t):
            return None if t is None else t.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)

        return (
            rep(prompt_embeds),
            rep(negative_prompt_embeds),
            rep(pooled_prompt_embeds),
            rep(negative_pooled_prompt_embeds),
        )

    # ---- img2img / inpainting ------------------------------------------------------------------
    def _encode_init_image(self, init_image, height, width, total, device, generator) -> torch.Tensor:
        """VAE latents (the distribution's mode: deterministic) of the init image at the output size."""
        pixels = self.image_processor.preprocess(init_image, height=height, width=width)
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        vae_dtype = torch.float32 if upcast else self.vae.dtype
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            dist = self.vae.encode(pixels.to(device, vae_dtype)).latent_dist
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)
        latents = dist.mode()
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = (latents - mean) * cfg.scaling_factor / std
        else:
            latents = latents * cfg.scaling_factor
        if latents.shape[0] != total:
            if total % latents.shape[0]:
                raise ValueError(f"init_image: {latents.shape[0]} images for a batch of {total}")
            latents = latents.repeat_interleave(total // latents.shape[0], dim=0)
        return latents

    def _strength_timesteps(self, timesteps, num_inference_steps: int, strength: float):
        """The last ``strength`` of the schedule (diffusers' img2img rule)."""
        init = min(num_inference_steps * strength, num_inference_steps)
        start = int(max(num_inference_steps - init, 0)) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return timesteps[start:]

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        image_embeds=None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        timesteps=None,
        sigmas=None,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        negative_prompt_2=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs=None,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
        ip_adapter_scale: float | None = None,
        control_mask=None,
        init_image=None,
        mask_image=None,
        strength: float = 1.0,
        faces=None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        **kwargs,
    ):
        r"""Generate images of the person whose face embedding is ``image_embeds``, posed by ``image``.

        Args:
            prompt (`str` or `list[str]`): what to draw; a list makes a batch. ``(word:1.2)`` weights and prompts
                longer than 77 tokens are understood (see :meth:`encode_weighted_prompt`).
            prompt_2 (`str` or `list[str]`, *optional*): prompt for the second text encoder (default: ``prompt``).
            image_embeds (array or tensor): the face embedding (insightface's raw ``embedding``, ``[512]``);
                ``[N, 512]`` or a list of N embeddings of the same person are averaged.
            image (`PIL.Image` or tensor, or a list with one per ControlNet): the keypoint image
                (:func:`draw_kps`) for IdentityNet, then the control images of further ControlNets.
            height (`int`, *optional*), width (`int`, *optional*): output size in pixels (multiples of 8);
                default: the keypoint image's size.
            num_inference_steps (`int`, defaults to 30): denoising steps (of the full schedule: with
                ``strength`` < 1 only its last part runs).
            timesteps (`list[int]`, *optional*), sigmas (`list[float]`, *optional*): a custom schedule, for
                schedulers that accept one.
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance; ``<= 1`` turns it off.
            negative_prompt (`str` or `list[str]`, *optional*), negative_prompt_2 (*optional*): what to avoid
                (weights understood as in ``prompt``).
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            eta (`float`, defaults to 0.0): DDIM's eta (other schedulers ignore it).
            generator (`torch.Generator` or a list, *optional*): for reproducible noise.
            latents (`torch.Tensor`, *optional*): starting noise instead of drawing it.
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
                (`torch.Tensor`, *optional*): precomputed text conditioning instead of the prompts.
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to True): a ``StableDiffusionXLPipelineOutput`` rather than a tuple.
            cross_attention_kwargs (`dict`, *optional*): passed to the UNet's attention processors
                (``"scale"`` is the LoRA scale of the text encoders).
            controlnet_conditioning_scale (`float` or a list per ControlNet, defaults to 0.8): IdentityNet
                strength (and the further ControlNets').
            control_guidance_start, control_guidance_end (`float` or a list per ControlNet): the fraction of
                the steps during which each ControlNet acts.
            ip_adapter_scale (`float`, *optional*): face-token strength in the UNet for this call only
                (default: the scale set by ``set_ip_adapter_scale``/``load_ip_adapter_instantid``).
            control_mask (PIL image, array or tensor, *optional*): where the face acts (1) or not (0):
                IdentityNet residuals and the face attention are multiplied by it.
            init_image (PIL image, array or tensor, *optional*): img2img: start from this picture (resized to
                the output size) instead of pure noise. Named so because ``image`` is the keypoint image in the
                official InstantID call.
            mask_image (PIL image, array or tensor, *optional*): inpainting: 1 (white) = regenerate, 0 = keep
                ``init_image``; the latents outside are reset to the (noised) original at every step and the
                decoded result is pasted back, so pixels where the mask is 0 are the original's.
            strength (`float`, defaults to 1.0): with ``init_image``, how much of the schedule runs: 0 returns
                the init image (through the VAE), 1 starts from pure noise.
            faces (`list[dict]`, *optional*): several people instead of ``image_embeds``/``image``: one dict
                per person with ``image_embeds``, ``image`` (their keypoint image, full size) and ``mask`` (their
                region; IdentityNet residuals and face tokens of that person act only there). See
                :func:`people_inputs`.
            original_size, crops_coords_top_left, target_size (`tuple`, *optional*): SDXL micro-conditioning.
            clip_skip (`int`, *optional*): CLIP layers to skip for the prompt embeddings.
            callback_on_step_end (`callable`, *optional*): ``f(pipe, step, timestep, tensors) -> dict`` after
                every step; a returned ``"latents"`` replaces the latents.
            callback_on_step_end_tensor_inputs (`list[str]`): the tensors passed to the callback
                (``latents``, ``prompt_embeds``, ``face_tokens``).
            **kwargs: accepted and ignored (the official pipeline's deprecated callback arguments).

        Returns:
            ``StableDiffusionXLPipelineOutput`` with ``images``, or a one-element tuple.
        """
        # 1. Check inputs
        self.check_inputs(
            prompt, prompt_2, image_embeds, image, height, width, num_inference_steps,
            negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, controlnet_conditioning_scale,
            control_guidance_start, control_guidance_end, num_images_per_prompt,
            callback_on_step_end_tensor_inputs, faces, init_image, mask_image, strength,
        )  # fmt: skip
        nets = self._controlnets()
        if faces is None:
            people = [(image_embeds, image[0] if len(nets) > 1 else image, control_mask)]
            images = list(image) if len(nets) > 1 else [image]
        else:
            people = [(f["image_embeds"], f["image"], f.get("mask")) for f in faces]
            images = [people[0][1]]
        scales = _per_net(controlnet_conditioning_scale, len(nets))
        starts = _per_net(control_guidance_start, len(nets))
        ends = _per_net(control_guidance_end, len(nets))

        # 2. Define call parameters
        first = images[0]
        if height is None or width is None:
            w0, h0 = first.size if isinstance(first, Image.Image) else (first.shape[-1], first.shape[-2])
            height, width = height or h0, width or w0
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        device = self._execution_device
        total = batch * num_images_per_prompt

        # 3. Encode input prompt (once per call; weighted/long prompts through encode_weighted_prompt)
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        texts = (prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2)
        if prompt_embeds is None and self._wants_weighting(
            prompt, prompt_2, negative_prompt, negative_prompt_2
        ):
            encoded = self.encode_weighted_prompt(*texts, clip_skip=clip_skip)
        else:
            encoded = self.encode_prompt(
                *texts,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = encoded

        # 4. Encode the face(s): tokens for IdentityNet, and after the text tokens for the UNet
        person_tokens = [self.encode_face(e, total, do_cfg).to(prompt_embeds.dtype) for e, _, _ in people]
        face_tokens = torch.cat(person_tokens, dim=1)
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        unet_context = torch.cat([prompt_embeds, face_tokens], dim=1)

        previous_scale = self._ip_scale()
        if ip_adapter_scale is not None:
            self.set_ip_adapter_scale(ip_adapter_scale)
        try:
            # 5. Prepare control images and the region masks
            dtype = nets[0].dtype
            prep = lambda im: self.prepare_image(  # noqa: E731
                im, width, height, total, num_images_per_prompt, device, dtype, do_cfg
            )
            cond_images = [prep(im) for im in images]
            person_conds = [cond_images[0]] if faces is None else [prep(kps) for _, kps, _ in people]
            unet_kwargs = dict(cross_attention_kwargs or {})
            unet_kwargs.pop("scale", None)
            # Text and face tokens are the same at every step: their keys/values are computed once per call.
            kv_cache: dict = {}
            if self._takes_kv_cache(self.unet):
                unet_kwargs["kv_cache"] = kv_cache
            net_kwargs = [{"kv_cache": kv_cache} if self._takes_kv_cache(net) else None for net in nets]
            person_masks = [
                None if m is None else mask_tensor(m, height, width).to(device, prompt_embeds.dtype)
                for _, _, m in people
            ]
            if len(people) > 1:
                unet_kwargs["region_mask"] = person_masks
            elif person_masks[0] is not None:
                unet_kwargs["region_mask"] = person_masks[0]
            maskers = [_ResidualMask(m) for m in person_masks]

            # 6. Prepare timesteps (the last `strength` of them when starting from an image)
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, device, timesteps, sigmas
            )
            if init_image is not None:
                timesteps = self._strength_timesteps(timesteps, num_inference_steps, strength)

            # 7. Prepare latent variables, guidance embedding, extra step kwargs and added time ids
            image_latents = noise = latent_mask = None
            if init_image is None:
                latents = self.prepare_latents(
                    total,
                    self.unet.config.in_channels,
                    height,
                    width,
                    prompt_embeds.dtype,
                    device,
                    generator,
                    latents,
                )
            else:
                image_latents = self._encode_init_image(init_image, height, width, total, device, generator)
                image_latents = image_latents.to(prompt_embeds.dtype)
                noise = (
                    randn_tensor(
                        image_latents.shape, generator=generator, device=device, dtype=image_latents.dtype
                    )
                    if latents is None
                    else latents.to(device, image_latents.dtype)
                )
                if strength >= 1.0:
                    latents = noise * self.scheduler.init_noise_sigma
                elif len(timesteps):
                    latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(total))
                else:
                    latents = image_latents
                if mask_image is not None:
                    latent_mask = mask_tensor(mask_image, *image_latents.shape[-2:], mode="bilinear")
                    latent_mask = latent_mask.to(device, image_latents.dtype)
            timestep_cond = None
            if self.unet.config.time_cond_proj_dim is not None:
                w = torch.tensor(guidance_scale - 1).repeat(total)
                timestep_cond = self.get_guidance_scale_embedding(
                    w, embedding_dim=self.unet.config.time_cond_proj_dim
                ).to(device=device, dtype=latents.dtype)
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
            add_time_ids = self._get_add_time_ids(
                original_size or (height, width),
                crops_coords_top_left,
                target_size or (height, width),
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=self.text_encoder_2.config.projection_dim
                if self.text_encoder_2 is not None
                else int(pooled_prompt_embeds.shape[-1]),
            ).to(device)
            add_time_ids = add_time_ids.repeat(prompt_embeds.shape[0], 1)
            added = {"text_embeds": pooled_prompt_embeds.to(device), "time_ids": add_time_ids}

            # 8. Denoising loop
            n = len(timesteps)
            self._num_timesteps = n
            with self.progress_bar(total=n) as progress:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        break
                    x = torch.cat([latents] * 2) if do_cfg else latents
                    x = self.scheduler.scale_model_input(x, t)
                    # 8.1 ControlNet residuals: IdentityNet once per person (their tokens, keypoints, region),
                    # the other ControlNets with the text tokens
                    down, mid = None, None
                    for k, (net, cond, s, st, en, nkw) in enumerate(
                        zip(nets, cond_images, scales, starts, ends, net_kwargs)
                    ):
                        keep = not (i / n < st or (i + 1) / n > en)
                        if not keep or s == 0:
                            continue
                        runs = (
                            zip(person_tokens, person_conds, maskers)
                            if k == 0
                            else [(prompt_embeds, cond, _ResidualMask(None))]
                        )
                        for context, cond_k, masked in runs:
                            d, m = net(
                                x,
                                t,
                                encoder_hidden_states=context,
                                controlnet_cond=cond_k,
                                conditioning_scale=s,
                                added_cond_kwargs=added,
                                cross_attention_kwargs=nkw,
                                return_dict=False,
                            )
                            if masked.mask is not None:
                                d, m = [masked(r) for r in d], masked(m)
                            down = d if down is None else [a + b for a, b in zip(down, d)]
                            mid = m if mid is None else mid + m
                    # 8.2 UNet noise prediction with text + face tokens
                    noise_pred = self.unet(
                        x,
                        t,
                        encoder_hidden_states=unet_context,
                        timestep_cond=timestep_cond,
                        cross_attention_kwargs=unet_kwargs or None,
                        down_block_additional_residuals=down,
                        mid_block_additional_residual=mid,
                        added_cond_kwargs=added,
                        return_dict=False,
                    )[0]
                    # 8.3 Guidance and scheduler step
                    if do_cfg:
                        uncond, cond_pred = noise_pred.chunk(2)
                        noise_pred = uncond + guidance_scale * (cond_pred - uncond)
                    latents = self.scheduler.step(
                        noise_pred, t, latents, **extra_step_kwargs, return_dict=False
                    )[0]
                    # 8.4 Inpainting: outside the mask, back to the original noised to the next step's level
                    if latent_mask is not None:
                        keep_latents = image_latents
                        if i + 1 < n:
                            keep_latents = self.scheduler.add_noise(
                                image_latents, noise, timesteps[i + 1 : i + 2].repeat(total)
                            )
                        latents = (1 - latent_mask) * keep_latents + latent_mask * latents
                    # 8.5 Step callback
                    if callback_on_step_end is not None:
                        available = {
                            "latents": latents,
                            "prompt_embeds": prompt_embeds,
                            "face_tokens": face_tokens,
                        }
                        wanted = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                        latents = callback_on_step_end(self, i, t, wanted).pop("latents", latents)
                    progress.update()
        finally:
            if ip_adapter_scale is not None and previous_scale is not None:
                self.set_ip_adapter_scale(previous_scale)

        # 9. Decode (inpainting: paste onto the original so unmasked pixels are the original's) and offload
        if mask_image is not None and output_type != "latent":
            decoded = self._decode(latents, "pt")
            original = self.image_processor.preprocess(init_image, height=height, width=width)
            original = (original.to(decoded.device, decoded.dtype) / 2 + 0.5).clamp(0, 1)
            pixel_mask = mask_tensor(mask_image, height, width, mode="bilinear").to(
                decoded.device, decoded.dtype
            )
            pasted = original * (1 - pixel_mask) + decoded * pixel_mask
            images_out = _as_output(self.image_processor, pasted, output_type)
        else:
            images_out = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images_out,)
        return StableDiffusionXLPipelineOutput(images=images_out)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.upcast_vae()
        latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)


# ---- helpers for scripts and apps ----------------------------------------------------------------
def _gen_size(width: int, height: int, size: int, multiple: int = 64) -> tuple[int, int]:
    """Generation size for a crop: longer side ``size``, aspect kept, both multiples of ``multiple``."""
    ratio = size / max(width, height)
    return (
        max(multiple, int(round(width * ratio)) // multiple * multiple),
        max(multiple, int(round(height * ratio)) // multiple * multiple),
    )


def detect_faces(analyzer, image) -> list[dict]:
    """Every face ``analyzer`` (a ``faceid.face.analysis.FaceAnalyzer``) finds in ``image``, left to right, as
    ``{"bbox": [4], "kps": [5, 2], "score": float}`` in the image's pixels."""
    from faceid.face.images import load_image, to_bgr

    image = image if isinstance(image, Image.Image) else load_image(image)
    det = analyzer.detect(to_bgr(image))
    order = left_to_right(det.bboxes) if len(det.bboxes) else []
    return [{"bbox": det.bboxes[i], "kps": det.kpss[i], "score": float(det.scores[i])} for i in order]


def pose_from_image(analyzer, image, size=None, min_side: int = 1024, max_side: int = 1280) -> dict:
    """Pose reference: the keypoints of the largest face of ``image`` (path or PIL), in an output frame of
    ``size`` (W, H) — by default the pose image resized like the face image would be (:func:`fit_size`).

    Returns ``{"kps", "kps_image", "size", "bbox"}`` (coordinates in the output frame); raises ``ValueError``
    when no face is found."""
    from faceid.face.images import load_image

    image = load_image(image) if not isinstance(image, Image.Image) else image
    face = analyzer.analyze(image)
    if face is None:
        raise ValueError("pose image: no face found")
    frame = tuple(face.frame)
    size = tuple(size) if size else fit_size(*frame, min_side=min_side, max_side=max_side)
    sx, sy = size[0] / frame[0], size[1] / frame[1]
    kps = np.asarray(face.kps, np.float64) * [sx, sy]
    bbox = np.asarray(face.bbox, np.float64) * [sx, sy, sx, sy]
    return {"kps": kps, "kps_image": draw_kps(size, kps), "size": size, "bbox": bbox}


def people_inputs(embeddings, size, bboxes, kps=None, region_scale: float = 2.0) -> list[dict]:
    """The ``faces=`` argument for several people: person ``i`` has embedding ``embeddings[i]``, face box
    ``bboxes[i]`` and keypoints ``kps[i]`` (default: estimated from the box) in an output of ``size`` (W, H).

    Each person's region is their box grown ``region_scale`` times, split between neighbours by the nearest face
    centre (:func:`faceid.face.regions.region_masks`); their keypoint image holds only their own keypoints."""
    if len(embeddings) != len(bboxes):
        raise ValueError(
            f"{len(embeddings)} identities for {len(bboxes)} face boxes: give one box per person"
        )
    kps = kps if kps is not None else [kps_from_bbox(b) for b in bboxes]
    masks = region_masks(size, bboxes, scale=region_scale)
    return [
        {"image_embeds": e, "image": draw_kps(size, k), "mask": m, "bbox": np.asarray(b, np.float64)}
        for e, k, m, b in zip(embeddings, kps, masks, bboxes)
    ]


def face_inpaint(
    pipe,
    image,
    image_embeds,
    prompt,
    bbox=None,
    kps=None,
    analyzer=None,
    size: int = 1024,
    context: float = 2.0,
    expand: float = 1.3,
    feather: float = 0.2,
    strength: float = 0.85,
    return_mask: bool = False,
    **call_kwargs,
):
    """Put the person of ``image_embeds`` into the photo ``image`` in place of its face.

    The face's ``bbox`` (and ``kps``) are given, or detected with ``analyzer`` (the largest face; keypoints are
    estimated from the box when only a box is given). A crop ``context`` times the face is generated at ``size``
    (longer side) from the photo (``strength`` of the schedule) with the target's keypoints, inside the face box
    grown ``expand`` times with feathered edges (``feather``); the result is pasted back with that mask, so every
    pixel outside it is the photo's. ``call_kwargs`` go to the pipeline (steps, guidance, generator, scales, ...).

    Returns the new photo (PIL), and the ``[H, W]`` mask when ``return_mask``.
    """
    from faceid.face.images import load_image

    image = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)
    if bbox is None:
        if analyzer is None:
            raise ValueError("face_inpaint: give bbox (x1, y1, x2, y2) or an analyzer to detect the face")
        face = analyzer.analyze(image)
        if face is None:
            raise ValueError("face_inpaint: no face found in the target image")
        bbox, kps = face.bbox, face.kps if kps is None else kps
    bbox = np.asarray(bbox, np.float64)
    kps = kps_from_bbox(bbox) if kps is None else np.asarray(kps, np.float64)
    x1, y1, x2, y2 = crop_box(bbox, image.size, context=max(context, expand * 1.1))
    cw, ch = x2 - x1, y2 - y1
    # Only the crop is regenerated: the mask is cut to it, so "outside the mask" really is untouched.
    mask = np.zeros((image.size[1], image.size[0]), np.float32)
    mask[y1:y2, x1:x2] = feathered_mask(image.size, bbox, expand=expand, feather=feather)[y1:y2, x1:x2]
    gw, gh = _gen_size(cw, ch, size)
    crop = image.crop((x1, y1, x2, y2)).resize((gw, gh), Image.LANCZOS)
    crop_mask = Image.fromarray(mask[y1:y2, x1:x2]).resize((gw, gh), Image.BILINEAR)
    crop_kps = (kps - [x1, y1]) * [gw / cw, gh / ch]
    out = pipe(
        prompt,
        image_embeds=image_embeds,
        image=draw_kps((gw, gh), crop_kps),
        init_image=crop,
        mask_image=np.clip(np.asarray(crop_mask, np.float32), 0, 1),
        strength=strength,
        width=gw,
        height=gh,
        output_type="pil",
        **call_kwargs,
    ).images[0]
    back = np.asarray(out.resize((cw, ch), Image.LANCZOS), np.float32)
    result = np.asarray(image, np.float32).copy()
    m = mask[y1:y2, x1:x2, None]
    result[y1:y2, x1:x2] = result[y1:y2, x1:x2] * (1 - m) + back * m
    result = Image.fromarray(np.clip(np.rint(result), 0, 255).astype(np.uint8))
    return (result, mask) if return_mask else result


def face_detail(
    pipe, image, image_embeds, prompt, bbox=None, kps=None, analyzer=None, strength=0.45, **kwargs
):
    """Face-detail pass for small faces: regenerate the face region of a generated ``image`` larger (at
    ``size``, default 1024) with the same identity and paste it back (:func:`face_inpaint` with a lower
    ``strength``, so the composition stays and the face gains detail)."""
    return face_inpaint(
        pipe, image, image_embeds, prompt, bbox=bbox, kps=kps, analyzer=analyzer, strength=strength, **kwargs
    )


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"path/to/lora.safetensors:0.8"`` → ``(path, 0.8)``; without ``:SCALE`` the scale is 1.0."""
    path, sep, scale = str(spec).rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return str(spec), 1.0


def load_loras(pipe, specs) -> list[str]:
    """Load LoRAs (``"PATH[:SCALE]"`` strings or ``(path, scale)`` pairs; a file or a folder with
    ``pytorch_lora_weights.safetensors``) into the UNet/text encoders and activate them all with their scales.
    Needs ``peft``. Returns the adapter names (``lora0``, ``lora1``...)."""
    names, weights = [], []
    for i, spec in enumerate(specs):
        path, scale = parse_lora_spec(spec) if isinstance(spec, str) else (str(spec[0]), float(spec[1]))
        if not Path(path).exists():
            raise FileNotFoundError(f"LoRA not found: {path}")
        __import__("faceid.weight_files").weight_files.check_lora(path)
        name = f"lora{i}"
        p = Path(path)
        if p.is_file():
            pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=name)
        else:
            pipe.load_lora_weights(str(p), adapter_name=name)
        names.append(name)
        weights.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def unload_loras(pipe) -> None:
    """Remove every LoRA: the weights are exactly those before :func:`load_loras`."""
    pipe.unload_lora_weights()


OFFLOAD_CHOICES = ("none", "model", "sequential")


def apply_memory_options(
    pipe, offload: str = "none", vae_slicing: bool = False, vae_tiling: bool = False, device=None
):
    """Small-GPU presets. ``offload="model"``: each model moves to the GPU only while it runs (the UNet and
    IdentityNet together during denoising); ``"sequential"``: layer by layer (least memory, slowest).
    ``vae_slicing`` decodes a batch one image at a time; ``vae_tiling`` decodes large images in tiles.
    ``device`` is the accelerator (default: the one found; on a CPU-only machine pass "cpu" to test)."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    return pipe


def load_pipeline(
    base_model,
    controlnet,
    face_adapter,
    device=None,
    dtype=None,
    extra_controlnets=(),
    progress: bool = True,
    vae=None,
):
    """Base SDXL + IdentityNet (+ extra ControlNets) + face adapter, on the best device available; ``vae`` is
    another VAE (folder or hub id), e.g. ``madebyollin/sdxl-vae-fp16-fix`` that decodes in fp16 without NaNs."""
    from faceid.runtime import dtype_kwargs, pick_device_dtype
    from faceid.weight_files import check_pipeline_inputs

    device, dtype = pick_device_dtype(device, dtype)
    check_pipeline_inputs(base_model, (controlnet, *extra_controlnets), face_adapter, vae)  # named errors
    nets = [
        ControlNetModel.from_pretrained(str(p), **dtype_kwargs(dtype))
        for p in (controlnet, *extra_controlnets)
    ]
    extra = {}
    if vae is not None:
        from diffusers import AutoencoderKL

        extra["vae"] = AutoencoderKL.from_pretrained(str(vae), **dtype_kwargs(dtype))
    pipe = StableDiffusionXLInstantIDPipeline.from_pretrained(
        str(base_model),
        controlnet=nets[0] if len(nets) == 1 else nets,
        **extra,
        add_watermarker=False,
        **dtype_kwargs(dtype),
    )
    pipe.set_progress_bar_config(disable=not progress)
    pipe.to(device)
    pipe.load_ip_adapter_instantid(str(face_adapter))
    return pipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Quick offline check of the InstantID pipeline on the tiny weights."
    )
    p.add_argument("--tiny", default=TINY_DIR, help="folder for the tiny checkpoints (built if missing)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--output", default="instantid_check.png")
    return p.parse_args(argv)


def main(args):
    from faceid.tiny.models import build_tiny

    paths = build_tiny(args.tiny, faces=False)
    pipe = load_pipeline(paths["base_model"], paths["controlnet"], paths["face_adapter"])
    kps = np.array([[20, 24], [44, 24], [32, 34], [22, 46], [42, 46]], dtype=np.float32)
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    out = pipe(args.prompt, image_embeds=emb, image=draw_kps((64, 64), kps), num_inference_steps=4).images[0]
    out.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
