"""Synthetic face embeddings with a known identity structure, for mining tests and the 1M benchmark.

Like a LAION-scale face set: many persons with 1-50 photos (counts ∝ c^-1.5, so a long tail of singletons), a
photo = its person's centre plus noise giving same-person cosines around ArcFace's (mean ≈ 0.65, mostly 0.5-0.8),
different persons ≈ 0 with a spread ≈ 0.08 (a shared 16-d "population" subspace holds 30% of the variance, as real
embeddings are not isotropic), and a share of near-duplicates (the same picture re-posted: cosine > 0.97).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceid.schema import EMBEDDING_DIM


@dataclass
class SyntheticIdentities:
    x: np.ndarray  # [n, d] float32, unit rows
    person: np.ndarray  # [n] int64 true identity
    dup_of: np.ndarray  # [n] int64: the row this one re-posts, -1 for an original photo


def photo_counts(num_persons: int, rng: np.random.Generator, max_photos: int = 50, alpha: float = 1.5):
    c = np.arange(1, max_photos + 1)
    p = c ** (-alpha)
    return rng.choice(c, size=num_persons, p=p / p.sum())


def synthetic_identities(
    num_rows: int,
    seed: int = 0,
    dim: int = EMBEDDING_DIM,
    max_photos: int = 50,
    dup_frac: float = 0.02,
    noise: tuple[float, float] = (0.55, 0.85),
    chunk: int = 131_072,
) -> SyntheticIdentities:
    """About ``num_rows`` rows (exactly ``num_rows``: the last person is cut), persons in random order."""
    rng = np.random.default_rng(seed)
    est = int(
        num_rows
        / (np.sum(np.arange(1, max_photos + 1) ** -0.5) / np.sum(np.arange(1, max_photos + 1) ** -1.5))
    )
    counts = photo_counts(max(est * 2, 8), rng, max_photos)
    total = np.cumsum(counts)
    counts = counts[: np.searchsorted(total, num_rows) + 1]
    counts[-1] -= int(counts.sum() - num_rows)
    person = np.repeat(np.arange(len(counts)), counts)
    person = rng.permutation(len(counts))[person]  # persons not in id order
    order = rng.permutation(num_rows)
    person = person[order]
    basis = np.linalg.qr(rng.standard_normal((dim, 16)))[0].astype(np.float32)
    num_persons = len(counts)
    centres = np.empty((num_persons, dim), np.float32)
    for s in range(0, num_persons, chunk):
        e = min(num_persons, s + chunk)
        z = rng.standard_normal((e - s, dim), dtype=np.float32) / np.sqrt(dim)
        low = rng.standard_normal((e - s, 16), dtype=np.float32) / 4.0 @ basis.T
        c = np.sqrt(0.7) * z / np.linalg.norm(z, axis=1, keepdims=True)
        c += np.sqrt(0.3) * low / np.linalg.norm(low, axis=1, keepdims=True)
        centres[s:e] = c / np.linalg.norm(c, axis=1, keepdims=True)
    spread = rng.uniform(*noise, size=num_persons).astype(np.float32)
    x = np.empty((num_rows, dim), np.float32)
    for s in range(0, num_rows, chunk):
        e = min(num_rows, s + chunk)
        p = person[s:e]
        u = rng.standard_normal((e - s, dim), dtype=np.float32) / np.sqrt(dim)
        r = spread[p] * rng.uniform(0.8, 1.2, size=e - s).astype(np.float32)
        v = centres[p] + r[:, None] * u
        x[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    del centres
    dup_of = np.full(num_rows, -1, np.int64)
    n_dup = int(num_rows * dup_frac)
    if n_dup:
        rows = rng.choice(num_rows, size=2 * n_dup, replace=False)
        src, dst = rows[:n_dup], rows[n_dup:]
        v = x[src] + 0.1 * rng.standard_normal((n_dup, dim), dtype=np.float32) / np.sqrt(dim)
        x[dst] = v / np.linalg.norm(v, axis=1, keepdims=True)
        person[dst] = person[src]
        dup_of[dst] = src
    return SyntheticIdentities(x, person.astype(np.int64), dup_of)
