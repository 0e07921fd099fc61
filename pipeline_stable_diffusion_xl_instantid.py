"""InstantID pipeline for SDXL: IdentityNet (a ControlNet fed face tokens + a keypoint image) and an IP-Adapter.

Official API (``load_ip_adapter_instantid``, ``set_ip_adapter_scale``, ``__call__(prompt, image_embeds=...,
image=kps_image, controlnet_conditioning_scale=...)``) plus:

* ``ip_adapter_scale`` per call, ``control_mask`` (IdentityNet residuals and face attention only inside a region);
* multi-ControlNet: IdentityNet first and fed the face tokens, the others get the text tokens as usual;
* several reference faces for one identity (``image_embeds`` of shape ``[N, 512]`` are averaged);
* batched ``num_images_per_prompt`` and any scheduler (LCM included).

The face tokens are computed once per call; the classifier-free-guidance negative for the face is the Resampler
applied to a zero embedding, as the official weights expect.

Run as a script for a quick offline check on the tiny weights: ``python pipeline_stable_diffusion_xl_instantid.py
--tiny tiny``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from PIL import Image

from faceid.face.kps import draw_kps, resize_img  # noqa: F401  (re-exported: the official module offers both)
from ip_adapter.attention_processor import AttnProcessor, IPAttnProcessor
from ip_adapter.weights import build_resampler, install_ip_processors, load_ip_layers, read_adapter

logger = logging.getLogger(__name__)

# Quick-check defaults (edit here or pass flags).
TINY_DIR = "tiny"
PROMPT = "a photo of a person, best quality"


def face_embedding_tensor(image_embeds, dim: int) -> torch.Tensor:
    """Embeddings of one identity (``[dim]``, ``[N, dim]``, ``[1, N, dim]`` or a list) → ``[1, dim]`` mean."""
    if isinstance(image_embeds, (list, tuple)):
        image_embeds = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in image_embeds])
    t = torch.as_tensor(np.asarray(image_embeds) if not torch.is_tensor(image_embeds) else image_embeds)
    t = t.detach().float().reshape(-1, t.shape[-1])
    if t.shape[-1] != dim:
        raise ValueError(f"face embedding has size {t.shape[-1]}, the adapter expects {dim}")
    return t.mean(dim=0, keepdim=True)


def mask_tensor(control_mask, height: int, width: int) -> torch.Tensor:
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
    return F.interpolate(m, size=(height, width), mode="nearest")


class StableDiffusionXLInstantIDPipeline(StableDiffusionXLControlNetPipeline):
    image_proj_model = None
    image_proj_model_in_features = 512

    # ---- adapter -------------------------------------------------------------------------------
    def load_ip_adapter_instantid(
        self, model_ckpt, image_emb_dim: int = 512, num_tokens: int | None = None, scale=0.5
    ):
        """Load an ``ip-adapter.bin``/``.safetensors`` (official layout; sizes are read from the checkpoint)."""
        image_proj, ip_layers = read_adapter(model_ckpt)
        resampler = build_resampler(image_proj, dtype=self.unet.dtype, device=self.unet.device).eval()
        if resampler.embedding_dim != image_emb_dim:
            raise ValueError(
                f"{model_ckpt}: Resampler takes {resampler.embedding_dim}-d embeddings, not {image_emb_dim}"
            )
        if num_tokens is not None and num_tokens != resampler.num_queries:
            raise ValueError(
                f"{model_ckpt}: the checkpoint has {resampler.num_queries} face tokens, not {num_tokens}"
            )
        self.image_proj_model = resampler
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
        # The Resampler's own device: with CPU offload the UNet sits on the CPU between calls, the Resampler
        # (not a pipeline component) stays where it was put.
        weight = self.image_proj_model.proj_in.weight
        emb = emb.to(weight.device, dtype=weight.dtype)
        if do_cfg:
            emb = torch.cat([torch.zeros_like(emb), emb])
        with torch.no_grad():
            tokens = self.image_proj_model(emb)
        return tokens.repeat_interleave(batch, dim=0).to(self._execution_device)

    # ---- generation ----------------------------------------------------------------------------
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
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        **kwargs,
    ):
        if image_embeds is None:
            raise ValueError("image_embeds (the face embedding) is required")
        if image is None:
            raise ValueError("image (the keypoint image) is required")
        nets = self._controlnets()
        images = list(image) if isinstance(image, (list, tuple)) and len(nets) > 1 else [image]
        if len(images) != len(nets):
            raise ValueError(f"{len(nets)} ControlNets need {len(nets)} control images, got {len(images)}")
        scales = controlnet_conditioning_scale
        scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(nets)
        starts = (
            control_guidance_start
            if isinstance(control_guidance_start, (list, tuple))
            else [control_guidance_start] * len(nets)
        )
        ends = (
            control_guidance_end
            if isinstance(control_guidance_end, (list, tuple))
            else [control_guidance_end] * len(nets)
        )

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

        # 1. Text and face conditioning (each once per call).
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = (
            self.encode_prompt(
                prompt,
                prompt_2,
                device,
                num_images_per_prompt,
                do_cfg,
                negative_prompt,
                negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
        )
        face_tokens = self.encode_face(image_embeds, total, do_cfg).to(prompt_embeds.dtype)
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        unet_context = torch.cat([prompt_embeds, face_tokens], dim=1)

        previous_scale = self._ip_scale()
        if ip_adapter_scale is not None:
            self.set_ip_adapter_scale(ip_adapter_scale)
        try:
            # 2. Control images, region mask.
            dtype = nets[0].dtype
            cond_images = [
                self.prepare_image(im, width, height, total, num_images_per_prompt, device, dtype, do_cfg)
                for im in images
            ]
            mask = None
            unet_kwargs = dict(cross_attention_kwargs or {})
            unet_kwargs.pop("scale", None)
            # Text and face tokens are the same at every step: their keys/values are computed once per call.
            kv_cache: dict = {}
            if self._takes_kv_cache(self.unet):
                unet_kwargs["kv_cache"] = kv_cache
            net_kwargs = [{"kv_cache": kv_cache} if self._takes_kv_cache(net) else None for net in nets]
            if control_mask is not None:
                mask = mask_tensor(control_mask, height, width).to(device, prompt_embeds.dtype)
                unet_kwargs["region_mask"] = mask
            res_masks: dict[tuple[int, int], torch.Tensor] = {}

            def masked(t: torch.Tensor) -> torch.Tensor:
                key = tuple(t.shape[-2:])
                if key not in res_masks:
                    res_masks[key] = F.interpolate(mask, size=key, mode="nearest").to(t.dtype)
                return t * res_masks[key]

            # 3. Timesteps, latents, micro-conditioning.
            timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, device, timesteps, sigmas
            )
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

            # 4. Denoising loop.
            n = len(timesteps)
            self._num_timesteps = n
            with self.progress_bar(total=n) as progress:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        break
                    x = torch.cat([latents] * 2) if do_cfg else latents
                    x = self.scheduler.scale_model_input(x, t)
                    down, mid = None, None
                    for k, (net, cond, s, st, en, nkw) in enumerate(
                        zip(nets, cond_images, scales, starts, ends, net_kwargs)
                    ):
                        keep = not (i / n < st or (i + 1) / n > en)
                        if not keep or s == 0:
                            continue
                        d, m = net(
                            x,
                            t,
                            encoder_hidden_states=face_tokens if k == 0 else prompt_embeds,
                            controlnet_cond=cond,
                            conditioning_scale=s,
                            added_cond_kwargs=added,
                            cross_attention_kwargs=nkw,
                            return_dict=False,
                        )
                        if k == 0 and mask is not None:
                            d, m = [masked(r) for r in d], masked(m)
                        down = d if down is None else [a + b for a, b in zip(down, d)]
                        mid = m if mid is None else mid + m
                    noise = self.unet(
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
                    if do_cfg:
                        uncond, cond_pred = noise.chunk(2)
                        noise = uncond + guidance_scale * (cond_pred - uncond)
                    latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[
                        0
                    ]
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


def load_pipeline(
    base_model, controlnet, face_adapter, device=None, dtype=None, extra_controlnets=(), progress: bool = True
):
    """Base SDXL + IdentityNet (+ extra ControlNets) + face adapter, on the best device available."""
    from faceid.runtime import dtype_kwargs, pick_device_dtype

    device, dtype = pick_device_dtype(device, dtype)
    nets = [
        ControlNetModel.from_pretrained(str(p), **dtype_kwargs(dtype))
        for p in (controlnet, *extra_controlnets)
    ]
    pipe = StableDiffusionXLInstantIDPipeline.from_pretrained(
        str(base_model),
        controlnet=nets[0] if len(nets) == 1 else nets,
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
    main(parse_args())
