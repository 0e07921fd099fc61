"""The map-style training dataset and its deterministic, rank-aware batch sampler.

Every random choice for one draw of one item (crop, flip, cross-identity reference, CFG drops) comes from
``sample_rng(seed, epoch, index)``, and the sampler's order from ``(seed, epoch)``. So the data a run sees is a
pure function of (seed, epoch, batch number): resuming at batch k of epoch e reproduces it exactly, with any
number of workers.
"""

from __future__ import annotations

import numpy as np
import torch

from faceid.face.images import enable_arrow, load_image
from faceid.schema import EMBEDDING_DIM
from faceid.train.records import Record, ReferencePicker, load_embedding, sample_rng
from faceid.train.transforms import (
    apply_image,
    cfg_drop,
    kps_image,
    nearest_bucket,
    plan_crop,
    to_chw_uint8,
    tokenize,
    transform_kps,
)

# Salts: one independent stream per purpose, so adding a draw for one never shifts another.
SALT_CROP, SALT_REF, SALT_DROP = 1, 2, 3


class FaceTrainDataset(torch.utils.data.Dataset):
    """Items are addressed as ``(index, epoch)`` (what :class:`EpochBatchSampler` yields) or a plain index
    (epoch 0)."""

    def __init__(
        self,
        records: list[Record],
        tokenizers=(),
        resolution: int = 1024,
        seed: int = 0,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        buckets=None,
        cross_id: bool = False,
        cross_id_prob: float = 1.0,
        text_drop: float = 0.05,
        face_drop: float = 0.05,
        both_drop: float = 0.05,
        with_pixels: bool = True,
        disk_cache=None,
    ):
        self.records = records
        self.tokenizers = list(tokenizers)
        self.resolution = resolution
        self.seed = seed
        self.random_crop = random_crop
        self.flip_prob = flip_prob
        self.buckets = list(buckets) if buckets else None
        self.picker = ReferencePicker(records, cross_id, cross_id_prob)
        self.drops = (text_drop, face_drop, both_drop)
        self.with_pixels = with_pixels
        # faceid.train.disk_cache.DiskCache: latents/text embeddings instead of pixels/captions to encode
        self.disk_cache = disk_cache
        enable_arrow()  # zero-copy pixel reads; here, once, so that forked workers do not each import pyarrow

    def __setstate__(self, state):  # a worker started by spawn / forkserver (Python 3.14's default on Linux)
        self.__dict__.update(state)
        enable_arrow()

    def __len__(self) -> int:
        return len(self.records)

    def target_size(self, index: int) -> tuple[int, int]:
        if not self.buckets:
            return self.resolution, self.resolution
        r = self.records[index]
        return self.buckets[nearest_bucket(r.width, r.height, self.buckets)]

    def largest_target(self) -> tuple[int, int]:
        """The target size with the most pixels (what a loader's shared-memory slot is sized for)."""
        return max(self.buckets or [(self.resolution, self.resolution)], key=lambda s: s[0] * s[1])

    def bucket_groups(self) -> list[list[int]]:
        """Indices grouped by target size (one group without buckets)."""
        if not self.buckets:
            return [list(range(len(self.records)))]
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(self.records)):
            groups.setdefault(self.target_size(i), []).append(i)
        return [groups[k] for k in sorted(groups)]

    def plan(self, index: int, epoch: int):
        r = self.records[index]
        rng = sample_rng(self.seed, epoch, index, SALT_CROP)
        return plan_crop(r.width, r.height, self.target_size(index), self.random_crop, self.flip_prob, rng)

    def cache_view(self, index: int, flip: bool):
        """The uint8 ``[3, H, W]`` view ``precompute_cache.py`` encodes: the centre crop in the item's bucket,
        mirrored or not (the crop training draws without ``--random_crop``)."""
        from dataclasses import replace

        rec = self.records[index]
        image = load_image(rec.image)
        plan = replace(plan_crop(image.width, image.height, self.target_size(index)), flip=bool(flip))
        return to_chw_uint8(apply_image(image, plan))

    def __getitem__(self, item) -> dict:
        index, epoch = (item, 0) if isinstance(item, (int, np.integer)) else (int(item[0]), int(item[1]))
        rec = self.records[index]
        if rec.width is None or rec.height is None:  # (the start-up check fills them)
            image = load_image(rec.image)
            rec.width, rec.height = image.size
        else:
            image = None
        plan = self.plan(index, epoch)
        out = {}
        cache = self.disk_cache
        if cache is not None and cache.has_latents:
            out["latent_params"] = cache.latent(rec.key, plan.flip)
        elif self.with_pixels:
            if image is None:  # at scale 1 only the rows down to the crop's bottom are decoded
                exact = plan.resized == (plan.width, plan.height)
                image = load_image(rec.image, rows=plan.top + plan.target[1] if exact else None)
            out["pixel_values"] = to_chw_uint8(apply_image(image, plan))
        kps = transform_kps(rec.kps, plan)
        out["kps_image"] = to_chw_uint8(kps_image(kps, plan))
        kind, ref = self.picker.pick(index, sample_rng(self.seed, epoch, index, SALT_REF))
        ref_index = ref if kind == "index" else -1
        spec = self.records[ref].embedding if kind == "index" else ref
        drop_text, drop_face = cfg_drop(sample_rng(self.seed, epoch, index, SALT_DROP), *self.drops)
        emb = np.zeros(EMBEDDING_DIM, np.float32) if drop_face else load_embedding(spec)
        caption = "" if drop_text else rec.caption
        if cache is not None and cache.has_text:
            out["prompt_embeds"], out["pooled_prompt_embeds"] = cache.text(caption)
        out.update(
            face_embeds=torch.from_numpy(emb),
            caption=caption,
            index=index,
            ref_index=ref_index,
            epoch=epoch,
            drop_text=drop_text,
            drop_face=drop_face,
            original_size=torch.tensor([plan.height, plan.width]),
            crop_top_left=torch.tensor([plan.top, plan.left]),
            target_size=torch.tensor([plan.target[1], plan.target[0]]),
            kps=torch.from_numpy(kps.astype(np.float32)),
        )
        for n, tok in enumerate(self.tokenizers):
            out["input_ids" if n == 0 else f"input_ids_{n + 1}"] = tokenize(tok, caption)[0]
        return out


def _hwc_view(t: torch.Tensor) -> bool:
    """``t`` is :func:`to_chw_uint8`'s ``[3, H, W]`` view of a contiguous ``[H, W, 3]`` uint8 array."""
    if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[0] != 3:
        return False
    c, h, w = t.shape
    return t.stride() == (1, w * c, c)


def collate(examples: list[dict]) -> dict:
    """Stack tensors, keep strings/ints as lists (the batch's bookkeeping: index, ref_index, epoch...).

    In a worker process the stacked tensors are written straight into shared memory (as torch's
    ``default_collate`` does), so handing the batch to the training process does not copy it once more
    (:func:`stack_into`). The training loader hands batches over through reused slots instead
    (:mod:`faceid.train.batch_pool`)."""
    shared = torch.utils.data.get_worker_info() is not None
    out = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if not isinstance(vals[0], torch.Tensor):
            out[k] = vals
            continue
        first = vals[0]
        if any(v.shape != first.shape or v.dtype != first.dtype for v in vals):
            out[k] = torch.stack(vals)  # raises the usual message
            continue
        if shared:
            storage = first._typed_storage()._new_shared(len(vals) * first.numel(), device=first.device)
            dest = first.new(storage).resize_(len(vals), *first.shape)
        else:
            dest = torch.empty((len(vals), *first.shape), dtype=first.dtype)
        stack_into(dest, vals)
        out[k] = dest
    return out


def stack_into(dest: torch.Tensor, vals: list[torch.Tensor]) -> None:
    """``torch.stack(vals, out=dest)``; images (``[3, H, W]`` views of ``[H, W, 3]`` arrays) are split into their
    planes by OpenCV, one vectorised pass instead of torch's strided copy."""
    import cv2

    if dest.numel() and all(_hwc_view(v) for v in vals):
        planes = dest.numpy()
        for b, v in enumerate(vals):
            cv2.split(v.permute(1, 2, 0).numpy(), list(planes[b]))
    else:
        torch.stack(vals, out=dest)


class EpochBatchSampler:
    """Deterministic batches for ``(seed, epoch)``, split across ranks, resumable mid-epoch.

    Each group (bucket) is permuted and cut into batches of ``batch_size`` (a short last batch is filled by
    wrapping round the same group, so every batch has one size and one shape); the batches are shuffled, their
    count padded to a multiple of ``world_size`` (by repeating from the start) and dealt ``rank::world_size``.
    Yields lists of ``(index, epoch)``. ``set_epoch(epoch, start_batch)`` skips the first ``start_batch``
    batches of this rank without loading them.
    """

    def __init__(
        self, groups, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle=True
    ):
        self.groups = [list(g) for g in groups if len(g)]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 0x5A3])
        batches: list[list[int]] = []
        for g in self.groups:
            perm = [g[i] for i in rng.permutation(len(g))] if self.shuffle else list(g)
            n = -(-len(perm) // self.batch_size) * self.batch_size
            perm = [perm[i % len(perm)] for i in range(n)]
            batches += [perm[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        n = -(-len(batches) // self.world_size) * self.world_size
        return [batches[i % len(batches)] for i in range(n)]

    def num_batches(self) -> int:
        """Batches per epoch on each rank (the same for every epoch)."""
        total = sum(-(-len(g) // self.batch_size) for g in self.groups)
        return -(-total // self.world_size)

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def __iter__(self):
        mine = self.global_batches(self.epoch)[self.rank :: self.world_size]
        for batch in mine[self.start_batch :]:
            yield [(i, self.epoch) for i in batch]
