"""Attention processors for InstantID, on ``scaled_dot_product_attention``.

* :class:`AttnProcessor` — plain attention (self-attention layers); identical maths to diffusers' ``AttnProcessor2_0``.
* :class:`IPAttnProcessor` — cross-attention whose last ``num_tokens`` context tokens are face tokens:
  ``out = attn(q, text) + scale * mask * attn(q, face)`` with bias-free ``to_k_ip``/``to_v_ip``. With several
  people the context ends with one group of ``num_tokens`` face tokens per person and ``region_mask`` is a list
  with one mask per group: ``out = attn(q, text) + scale * sum_i mask_i * attn(q, face_i)``.

Both are ``nn.Module`` so that ``nn.ModuleList(unet.attn_processors.values())`` indexes them like the official
code (odd index = cross-attention) and both accept ``region_mask`` through ``cross_attention_kwargs``: a
``[H, W]`` or ``[B, 1, H, W]`` tensor in image or latent space, resized to each layer's token grid, that limits
where the face tokens act. No global state and no attention maps are kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mask_to_tokens(region_mask: torch.Tensor, num_tokens: int, batch: int) -> torch.Tensor:
    """Resize a spatial mask to a ``[B, num_tokens, 1]`` token mask for a layer with ``num_tokens`` positions."""
    m = region_mask
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    h, w = m.shape[-2:]
    factor = math.sqrt(h * w / num_tokens)
    th, tw = max(1, round(h / factor)), max(1, round(w / factor))
    if th * tw != num_tokens:  # odd sizes: find the grid with the mask's aspect that matches
        for cand in range(1, num_tokens + 1):
            if num_tokens % cand == 0 and abs(cand / (num_tokens // cand) - h / w) <= abs(th / tw - h / w):
                th, tw = cand, num_tokens // cand
        if th * tw != num_tokens:
            raise ValueError(f"cannot map a {h}x{w} mask onto {num_tokens} tokens")
    m = F.interpolate(m.float(), size=(th, tw), mode="nearest").reshape(m.shape[0], num_tokens, 1)
    if m.shape[0] != batch:
        m = m.expand(batch, -1, -1) if m.shape[0] == 1 else m.repeat_interleave(batch // m.shape[0], dim=0)
    return m


class _Base(nn.Module):
    """Shared prologue/epilogue of diffusers' attention (spatial norm, 4-D inputs, residual, rescale); the
    processors differ only in :meth:`_attend`. diffusers reads ``__call__``'s signature to decide which
    ``cross_attention_kwargs`` to pass, so ``region_mask`` and ``kv_cache`` must stay named here."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        region_mask=None,
        kv_cache=None,
    ):
        residual = hidden_states
        hidden_states, shape4 = self._prologue(attn, hidden_states, temb)
        out = self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, region_mask, kv_cache)
        return self._epilogue(attn, out, residual, shape4)

    @staticmethod
    def _prologue(attn, hidden_states, temb):
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = None
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            shape4 = (b, c, h, w)
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape4

    @staticmethod
    def _sdpa(attn, query, key, value, attention_mask=None):
        b = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        q = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        return out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)

    @staticmethod
    def _epilogue(attn, hidden_states, residual, shape4):
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape4 is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(*shape4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _mask(attn, attention_mask, sequence_length, batch):
        if attention_mask is None:
            return None
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        return attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])


class AttnProcessor(_Base):
    """Plain attention; ``region_mask`` is accepted and ignored (it only concerns face tokens).

    With ``kv_cache`` (a dict the pipeline creates per call and passes through ``cross_attention_kwargs``) the
    cross-attention keys/values of a context that does not change between denoising steps are computed once.
    """

    def _attend(self, attn, hidden_states, encoder_hidden_states, attention_mask, region_mask, kv_cache):
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            batch, seq = hidden_states.shape[:2]
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            batch, seq = encoder_hidden_states.shape[:2]
            key, value = _cached(
                kv_cache,
                # IdentityNet runs once per person. No id() without a cache: torch.compile (--compile) would
                # guard on that tensor's identity and recompile at every step.
                None if kv_cache is None else (id(attn), "kv", id(encoder_hidden_states)),
                encoder_hidden_states,
                lambda: _project(attn, encoder_hidden_states),
            )
        attention_mask = self._mask(attn, attention_mask, seq, batch)
        return self._sdpa(attn, query, key, value, attention_mask)


def _project(attn, context):
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k(context), attn.to_v(context)


def _cached(kv_cache, key, context, compute):
    """``compute()`` once per ``(key, context tensor)`` when a per-call cache is given, else every time."""
    if kv_cache is None:
        return compute()
    entry = kv_cache.get(key)
    if entry is not None and entry[0] is context:
        return entry[1]
    value = compute()
    kv_cache[key] = (context, value)
    return value


class IPAttnProcessor(_Base):
    """Cross-attention with decoupled face tokens (the last ``num_tokens`` of the context)."""

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int | None = None,
        scale: float = 1.0,
        num_tokens: int = 16,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim or hidden_size
        self.scale = scale
        self.num_tokens = num_tokens
        self.to_k_ip = nn.Linear(self.cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(self.cross_attention_dim, hidden_size, bias=False)

    def _kv(self, attn, context, groups: int = 1):
        """Text keys/values, then one (key, value) pair per face group, each projected on its own (so a person's
        tokens give the same numbers whether or not others share the image)."""
        end = context.shape[1] - groups * self.num_tokens
        text = context[:, :end]
        faces = [
            context[:, end + g * self.num_tokens : end + (g + 1) * self.num_tokens] for g in range(groups)
        ]
        return (*_project(attn, text), [(self.to_k_ip(f), self.to_v_ip(f)) for f in faces])

    def _attend(self, attn, hidden_states, encoder_hidden_states, attention_mask, region_mask, kv_cache):
        if encoder_hidden_states is None:
            raise ValueError("IPAttnProcessor needs encoder_hidden_states = cat([text tokens, face tokens])")
        # One mask per face group when several people share the image; a single mask (or None) for one face.
        masks = list(region_mask) if isinstance(region_mask, (list, tuple)) else [region_mask]
        groups = len(masks)
        batch, total = encoder_hidden_states.shape[:2]
        end = total - groups * self.num_tokens
        if end <= 0:
            raise ValueError(
                f"context has {total} tokens; expected text tokens followed by {groups} x {self.num_tokens} "
                "face tokens"
            )
        key, value, face_kv = _cached(
            kv_cache,
            (id(attn), "ip", groups),
            encoder_hidden_states,
            lambda: self._kv(attn, encoder_hidden_states, groups),
        )
        attention_mask = self._mask(attn, attention_mask, end, batch)
        query = attn.to_q(hidden_states)
        out = self._sdpa(attn, query, key, value, attention_mask)
        if self.scale != 0:
            face = None
            for g, (mask, (face_key, face_value)) in enumerate(zip(masks, face_kv)):
                face_out = self._sdpa(attn, query, face_key, face_value)
                if mask is not None:
                    tokens = face_out.shape[1]
                    token_mask = _cached(
                        kv_cache,
                        ("mask", tokens, batch, g),
                        mask,
                        lambda m=mask, o=face_out: mask_to_tokens(m.to(o.device), o.shape[1], batch).to(
                            o.dtype
                        ),
                    )
                    face_out = face_out * token_mask
                face = face_out if face is None else face + face_out
            out = out + self.scale * face
        return out


# Names the official InstantID and IP-Adapter scripts import (``from ip_adapter.attention_processor import
# IPAttnProcessor2_0 as IPAttnProcessor, AttnProcessor2_0 as AttnProcessor``): ours are SDPA-based already.
AttnProcessor2_0 = AttnProcessor
IPAttnProcessor2_0 = IPAttnProcessor
