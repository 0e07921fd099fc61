"""Perceiver Resampler with the official InstantID parameter names, so ``image_proj`` loads with ``strict=True``.

Official sizes: dim 1280, depth 4, heads 20, dim_head 64, 16 queries, 512 → 2048, ff_mult 4. Sizes can be read
back from a state dict (:func:`resampler_kwargs_from_state`), so small test checkpoints stay small.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OFFICIAL_KWARGS = dict(
    dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4
)


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class Resampler(nn.Module):
    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.num_queries = num_queries
        self.output_dim = output_dim
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    # Pipelines ask every component for these (diffusers' ``pipe.device``/``pipe.dtype``, offload hooks).
    @property
    def device(self) -> torch.device:
        return self.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.latents.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, embedding_dim]`` or ``[B, N, embedding_dim]`` → ``[B, num_queries, output_dim]``."""
        if x.ndim == 2:
            x = x[:, None]
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def resampler_kwargs_from_state(state: dict) -> dict:
    """Constructor kwargs that fit ``state`` (an ``image_proj`` state dict).

    Head count is not visible in the shapes; the official 64-wide heads are assumed when the inner width
    allows it (official: 1280 → 20 heads), otherwise one head.
    """
    try:
        _, num_queries, dim = state["latents"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        inner = state["layers.0.0.to_q.weight"].shape[0]
        ff_inner = state["layers.0.1.1.weight"].shape[0]
        embedding_dim = state["proj_in.weight"].shape[1]
        output_dim = state["proj_out.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"not a Resampler state dict (missing or malformed {exc})") from exc
    dim_head = 64 if inner % 64 == 0 else inner
    return dict(
        dim=dim,
        depth=depth,
        dim_head=dim_head,
        heads=inner // dim_head,
        num_queries=num_queries,
        embedding_dim=embedding_dim,
        output_dim=output_dim,
        ff_mult=ff_inner // dim,
    )
