"""Shared-memory slots that carry collated batches from DataLoader workers to the training process.

torch's default hand-over puts every batch into *new* shared memory: a fresh file per tensor, its pages faulted in
by the worker (a 1024 px sample is 6 MB of image and keypoint planes, ~5 ms of kernel time on a 2-core machine),
a file descriptor passed and mapped per tensor, and the pages freed again once the step is done. With PNG decoding
at ~15 ms a sample, that hand-over was a third of a worker's time.

A :class:`BatchPool` maps a few batch-sized slots once per pass, before the workers start. A worker writes a batch into
one of its own free slots (pages already there) and sends only the slot number and the layout; the training process hands out the tensors as views of the slot, and the slot is free again when the last
of them is gone. The batches are the same bytes as :func:`faceid.train.dataset.collate` gives. A batch that does
not fit, or finds no free slot (the trainer holding on to more batches than the DataLoader prefetches), takes
torch's path instead: slower, never blocked.
"""

from __future__ import annotations

import multiprocessing
import weakref

import numpy as np
import torch

from faceid.train.dataset import collate, stack_into

SLOT_KEY = "_pool_slot"
ALIGN = 64


class BatchPool:
    """``workers`` × ``per_worker`` slots of ``slot_bytes`` each; create it in the training process, then the
    DataLoader whose ``collate_fn`` is :meth:`collate` (its workers inherit or unpickle the slots), and pass each
    batch the loader yields through :meth:`finish`."""

    def __init__(self, slot_bytes: int, workers: int, per_worker: int = 4):
        # (shared memory: workers × per_worker × slot_bytes, allocated here)
        self.slot_bytes = -(-int(slot_bytes) // ALIGN) * ALIGN
        self.workers = int(workers)
        self.per_worker = int(per_worker)
        n = self.workers * self.per_worker
        # One shared block: slot s is bytes [s * slot_bytes, (s + 1) * slot_bytes); torch shares it with workers
        # by fork or, under spawn/forkserver, by file descriptor when the collate_fn is pickled.
        self.memory = torch.empty(0, dtype=torch.uint8).set_(
            torch.UntypedStorage._new_shared(max(n * self.slot_bytes, 1))
        )
        self.busy = torch.zeros(n, dtype=torch.uint8).share_memory_()
        # The lock orders the training process's reads of a slot before a worker's next writes into it (the
        # default context: the DataLoader's, which PooledLoader leaves as it is).
        self.lock = multiprocessing.get_context().Lock()
        self.fallbacks = 0  # batches that came torch's way (counted by finish)
        self._bytes = None  # this process's numpy view of the slots

    def _claim(self, worker: int) -> int | None:
        with self.lock:
            for s in range(worker * self.per_worker, (worker + 1) * self.per_worker):
                if not self.busy[s]:
                    self.busy[s] = 1
                    return s
        return None

    def _release(self, slot: int) -> None:
        # (a worker killed while it held the lock must not hang the trainer: free the slot without it)
        locked = self.lock.acquire(timeout=10)
        try:
            self.busy[slot] = 0
        finally:
            if locked:
                self.lock.release()

    def collate(self, examples: list[dict]) -> dict:
        """In a worker: the batch written into a free slot (``{SLOT_KEY: (slot, layout), **non-tensor values}``).
        Elsewhere, or when it does not fit: :func:`collate`'s batch."""
        info = torch.utils.data.get_worker_info()
        if info is None or info.id >= self.workers:
            return collate(examples)
        layout, end = [], 0
        for k, first in examples[0].items():
            if not isinstance(first, torch.Tensor):
                layout.append((k, None, None, None))
                continue
            if any(e[k].shape != first.shape or e[k].dtype != first.dtype for e in examples):
                return collate(examples)  # (raises torch.stack's message)
            start = -(-end // ALIGN) * ALIGN
            end = start + len(examples) * first.numel() * first.element_size()
            layout.append((k, first.dtype, (len(examples), *first.shape), start))
        slot = self._claim(info.id) if end <= self.slot_bytes else None
        if slot is None:
            return collate(examples)
        base = self.memory[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]
        out = {SLOT_KEY: (slot, layout)}
        for k, dtype, shape, start in layout:
            vals = [e[k] for e in examples]
            if dtype is None:
                out[k] = vals
                continue
            stack_into(_view(base, dtype, shape, start), vals)
        return out

    def finish(self, batch: dict) -> dict:
        """In the training process: the batch's tensors as views of its slot, which is free again once the last
        of them (or of any view taken from them) is gone."""
        if SLOT_KEY not in batch:
            self.fallbacks += 1
            return batch
        slot, layout = batch[SLOT_KEY]
        if self._bytes is None:
            self._bytes = self.memory.numpy()
        # One array object per batch owns the slot's bytes: every tensor below (and every view of those) keeps
        # it alive, and its finaliser frees the slot when the last one goes.
        owner = np.frombuffer(
            memoryview(self._bytes)[slot * self.slot_bytes : (slot + 1) * self.slot_bytes], np.uint8
        )
        weakref.finalize(owner, self._release, slot).atexit = False
        data = torch.from_numpy(owner)
        return {
            k: batch[k] if dtype is None else _view(data, dtype, shape, start)
            for k, dtype, shape, start in layout
        }


def _view(base: torch.Tensor, dtype: torch.dtype, shape: tuple, start: int) -> torch.Tensor:
    n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return base[start : start + n].view(dtype).view(shape)


def item_bytes_bound(width: int, height: int, pixels: bool = True, cache=None) -> int:
    """An upper bound of one item's tensor bytes at target size ``width`` × ``height``: the keypoint image (3 bytes
    a pixel), the pixels (3) or a cached fp32 latent posterior (8 channels at 1/8 scale), cached text embeddings
    (SDXL's ``[77, 2048]`` + ``[1280]``, fp32 at most), 16 KiB for token ids, the face embedding and sizes. torch
    allocates shared memory in full, so the slots are this size, not more."""
    area = width * height
    n = 3 * area + 16 * 1024
    if cache is not None and cache.has_latents:
        n += 8 * (area // 64) * 4
    elif pixels:
        n += 3 * area
    if cache is not None and cache.has_text:
        n += (77 * 2048 + 1280) * 4
    return n


class PooledLoader:
    """Batches from ``make_loader(collate_fn)`` (a DataLoader whose workers call ``collate_fn`` on each batch's
    items) through a fresh :class:`BatchPool` per pass, so that workers left over from an abandoned pass never
    write into the slots of the next. Without workers, plain :func:`collate`."""

    def __init__(self, make_loader, num_workers: int, slot_bytes: int, length: int):
        self.make_loader = make_loader
        self.num_workers = int(num_workers)
        self.slot_bytes = int(slot_bytes)
        self.length = int(length)
        self.pool = None  # the last pass's

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if self.num_workers == 0:
            yield from self.make_loader(collate)
            return
        # A worker has at most the DataLoader's prefetch_factor (2) batches in flight, plus the one handed over
        # and the one the trainer holds while it takes the next.
        self.pool = pool = BatchPool(self.slot_bytes, self.num_workers, per_worker=4)
        for batch in self.make_loader(pool.collate):
            yield pool.finish(batch)


def map_loader(dataset, batch_sampler, num_workers: int) -> PooledLoader:
    """The training loader over a map-style dataset (:class:`faceid.train.dataset.FaceTrainDataset`) and its
    batch sampler."""
    size = dataset.largest_target()
    slot_bytes = batch_sampler.batch_size * item_bytes_bound(*size, dataset.with_pixels, dataset.disk_cache)
    return PooledLoader(
        lambda collate_fn: torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn
        ),
        num_workers,
        slot_bytes,
        length=len(batch_sampler),
    )


def stream_loader(dataset, num_workers: int) -> PooledLoader:
    """The training loader over an iterable dataset that collates its own batches in the workers
    (:class:`faceid.train.webdataset_shards.ShardDataset`, through its ``collate_fn``)."""

    def make(collate_fn):
        dataset.collate_fn = collate_fn
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)

    res = dataset.resolution
    slot_bytes = dataset.batch_size * item_bytes_bound(res, res, cache=dataset.disk_cache)
    return PooledLoader(make, num_workers, slot_bytes, length=dataset.num_batches() - dataset.start_batch)
