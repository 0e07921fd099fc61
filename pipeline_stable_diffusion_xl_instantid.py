"""InstantID pipeline for SDXL: IdentityNet (a ControlNet fed face tokens + a keypoint image) and an IP-Adapter.

Official API (``load_ip_adapter_instantid``, ``set_ip_adapter_scale``, ``__call__(prompt, image_embeds=...,
image=kps_image, controlnet_conditioning_scale=...)``) plus:

* ``ip_adapter_scale`` per call, ``control_mask`` (IdentityNet residuals and face attention only inside a region);
* multi-ControlNet: IdentityNet first and fed the face tokens, the others get the text tokens as usual;
* several reference faces for one identity (``image_embeds`` of shape ``[N, 512]`` are averaged);
* batched ``num_images_per_prompt`` and any scheduler (LCM included);
* img2img and inpainting (``init_image``, ``mask_image``, ``strength``; ``image`` stays the keypoint image as in
  the official call);
* several people (``faces=[{"image_embeds", "image", "mask"}, ...]``, see :func:`people_inputs`): each face's
  IdentityNet residuals and face tokens act only inside its own region;
* prompt weighting ``(word:1.2)`` and prompts longer than 77 tokens for both text encoders (plain prompts go
  through diffusers' ``encode_prompt`` unchanged);
* the face Resampler is a pipeline component (``image_proj_model``): it follows ``pipe.to(...)``, the official
  ``pipe.cuda(dtype, use_xformers)``, CPU offload, and ``save_pretrained``/``from_pretrained``;
* :func:`load_pipeline`: the weights, VAE, LoRAs and memory options in one call.

The face tokens are computed once per call; the classifier-free-guidance negative for the face is the Resampler
applied to a zero embedding, as the official weights expect.

The helpers apps use live in ``faceid/generation/`` and are re-exported here (``from
pipeline_stable_diffusion_xl_instantid import face_inpaint, people_inputs, ...`` keeps working):
:func:`detect_faces`, :func:`pose_from_image`, :func:`people_inputs`, :func:`face_inpaint`, :func:`face_detail`
(``composition.py``), :func:`load_loras`/:func:`unload_loras` (``loras.py``), :func:`apply_memory_options`
(``memory.py``); the prompt windows are in ``prompts.py``, the VAE/latents helpers in ``latents.py``.

Run as a script for a quick offline check on the tiny weights: ``python pipeline_stable_diffusion_xl_instantid.py
--tiny tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from PIL import Image

from faceid.face.kps import draw_kps, fit_size, resize_img  # noqa: F401  (re-exported: the official module has both)
from faceid.files import apply_umask
from faceid.generation import latents as latent_ops
from faceid.generation import prompts as prompt_windows
from faceid.generation.call_inputs import check_call_inputs
from faceid.generation.composition import (  # noqa: F401  (re-exported for apps)
    detect_faces,
    face_detail,
    face_inpaint,
    people_inputs,
    pose_from_image,
)
from faceid.generation.conditioning import added_conditions, prepare_controls, residuals
from faceid.generation.loras import load_loras, parse_lora_spec, unload_loras  # noqa: F401  (re-exported)
from faceid.generation.memory import OFFLOAD_CHOICES, apply_memory_options
from faceid.weight_files import check_pipeline_inputs
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
            apply_umask(save_directory)  # safetensors writes 0600 whatever the umask
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

    @contextlib.contextmanager
    def _ip_scaled(self, scale: float | None):
        """``scale`` for the duration of one call; the scale set before comes back afterwards."""
        previous = self._ip_scale()
        if scale is not None:
            self.set_ip_adapter_scale(scale)
        try:
            yield
        finally:
            if scale is not None and previous is not None:
                self.set_ip_adapter_scale(previous)

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
    def check_inputs(self, *args, **kwargs):
        """Raise ``ValueError`` naming the first argument that cannot work (before any model runs); the arguments
        are ``__call__``'s, see :func:`faceid.generation.call_inputs.check_call_inputs`."""
        check_call_inputs(self, *args, **kwargs)

    # ---- prompt weighting (faceid/generation/prompts.py) -----------------------------------------
    def encode_weighted_prompt(self, prompt, prompt_2=None, device=None, *args, **kwargs):
        """``encode_prompt`` with ``(word:1.2)`` weights and no 77-token limit, for SDXL's two encoders (see
        :func:`faceid.generation.prompts.encode_weighted_prompt`)."""
        return prompt_windows.encode_weighted_prompt(self, prompt, prompt_2, device, *args, **kwargs)

    def _encode_text(
        self, prompt, prompt_2, device, num_images, do_cfg, negative_prompt, negative_prompt_2, embeds, clip_skip,
        lora_scale,
    ):  # fmt: skip
        """Stage 3: ``encode_prompt``'s four tensors; weighted or long prompts through the windowed encoder."""
        texts = (prompt, prompt_2, device, num_images, do_cfg, negative_prompt, negative_prompt_2)
        if embeds[0] is None and prompt_windows.wants_weighting(
            self, prompt, prompt_2, negative_prompt, negative_prompt_2
        ):
            return self.encode_weighted_prompt(*texts, clip_skip=clip_skip)
        return self.encode_prompt(
            *texts,
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
            pooled_prompt_embeds=embeds[2],
            negative_pooled_prompt_embeds=embeds[3],
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

    # ---- stages of __call__ ----------------------------------------------------------------------
    def _people(self, image_embeds, image, control_mask, faces, count: int):
        """``[(embedding, keypoint image, region mask)]`` per person and the control image of each ControlNet."""
        if faces is None:
            return [(image_embeds, image[0] if count > 1 else image, control_mask)], (
                list(image) if count > 1 else [image]
            )
        people = [(f["image_embeds"], f["image"], f.get("mask")) for f in faces]
        return people, [people[0][1]]

    def _noise_pred(self, x, t, unet_context, timestep_cond, controls, res, added, guidance_scale):
        """Stage 8.2: the UNet with text + face tokens and the ControlNet residuals ``res``, then classifier-free
        guidance (``guidance_scale`` None: off)."""
        down, mid = res
        noise_pred = self.unet(
            x,
            t,
            encoder_hidden_states=unet_context,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=controls.unet_kwargs or None,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if guidance_scale is None:
            return noise_pred
        uncond, cond_pred = noise_pred.chunk(2)
        return uncond + guidance_scale * (cond_pred - uncond)

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
        people, images = self._people(image_embeds, image, control_mask, faces, len(nets))

        # 2. Define call parameters
        if height is None or width is None:
            first = images[0]
            w0, h0 = first.size if isinstance(first, Image.Image) else (first.shape[-1], first.shape[-2])
            height, width = height or h0, width or w0
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        batch = prompt_embeds.shape[0] if prompt is None else 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device
        total = batch * num_images_per_prompt

        # 3. Encode input prompt (once per call; weighted/long prompts through encode_weighted_prompt)
        embeds = (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        embeds = self._encode_text(
            prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, embeds,
            clip_skip, (cross_attention_kwargs or {}).get("scale"),
        )  # fmt: skip
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = embeds

        # 4. Encode the face(s): tokens for IdentityNet, and after the text tokens for the UNet
        person_tokens = [self.encode_face(e, total, do_cfg).to(prompt_embeds.dtype) for e, _, _ in people]
        face_tokens = torch.cat(person_tokens, dim=1)
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        unet_context = torch.cat([prompt_embeds, face_tokens], dim=1)

        # 5. Prepare control images, region masks and the attention kwargs
        controls = prepare_controls(
            self, people, images, faces is not None, (width, height), total, num_images_per_prompt, device,
            do_cfg, cross_attention_kwargs, prompt_embeds.dtype,
            (controlnet_conditioning_scale, control_guidance_start, control_guidance_end),
        )  # fmt: skip

        # 6. Prepare timesteps (the last `strength` of them when starting from an image)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        if init_image is not None:
            timesteps = latent_ops.strength_timesteps(
                self.scheduler, timesteps, num_inference_steps, strength
            )

        # 7. Prepare latent variables, guidance embedding, extra step kwargs and added time ids
        latents, start = latent_ops.prepare_start(
            self, init_image, mask_image, strength, timesteps, (width, height), total, prompt_embeds.dtype,
            device, generator, latents,
        )  # fmt: skip
        timestep_cond, added = added_conditions(
            self, (width, height), (original_size, crops_coords_top_left, target_size), guidance_scale, total,
            prompt_embeds, pooled_prompt_embeds, device, latents.dtype,
        )  # fmt: skip
        step_kwargs = {**self.prepare_extra_step_kwargs(generator, eta), "return_dict": False}
        cfg = guidance_scale if do_cfg else None

        # 8. Denoising loop (with this call's ip_adapter_scale)
        n = self._num_timesteps = len(timesteps)
        with self._ip_scaled(ip_adapter_scale), self.progress_bar(total=n) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                x = self.scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
                # 8.1 ControlNet residuals
                res = residuals(self, x, t, i, n, controls, person_tokens, prompt_embeds, added)
                # 8.2 UNet noise prediction with text + face tokens, and guidance
                noise_pred = self._noise_pred(x, t, unet_context, timestep_cond, controls, res, added, cfg)
                # 8.3 Scheduler step
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs)[0]
                # 8.4 Inpainting: outside the mask, back to the original noised to the next step's level
                if start is not None:
                    latents = latent_ops.keep_outside(self, latents, start, timesteps, i, total)
                # 8.5 Step callback
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "face_tokens": face_tokens}
                    wanted = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, i, t, wanted).pop("latents", latents)
                progress.update()

        # 9. Decode (inpainting: paste onto the original so unmasked pixels are the original's) and offload
        images = latent_ops.decode_output(self, latents, init_image, mask_image, (width, height), output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)


def load_pipeline(
    base_model,
    controlnet,
    face_adapter,
    device=None,
    dtype=None,
    extra_controlnets=(),
    progress: bool = True,
    vae=None,
    loras=(),
    offload: str = "none",
    vae_slicing: bool = False,
    vae_tiling: bool = False,
):
    """Base SDXL + IdentityNet (+ extra ControlNets) + face adapter, on the best device available; ``vae`` is
    another VAE (folder or hub id), e.g. ``madebyollin/sdxl-vae-fp16-fix`` that decodes in fp16 without NaNs;
    ``loras`` are ``PATH[:SCALE]`` specs (:func:`load_loras`); ``offload``/``vae_slicing``/``vae_tiling`` are the
    small-GPU presets of :func:`apply_memory_options`."""
    from faceid.runtime import dtype_kwargs, pick_device_dtype

    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
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
    if loras:
        load_loras(pipe, loras)
    return apply_memory_options(
        pipe,
        offload=offload,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        device=device if offload != "none" else None,
    )


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
