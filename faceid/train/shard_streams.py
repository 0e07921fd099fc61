"""Reading remote WebDataset shards as streams for :class:`faceid.train.webdataset_shards.ShardDataset`.

A DataLoader worker reads each shard its batches touch once, front to back (``tarfile`` mode ``'r|'``), keeps the
members of the samples it needs and stops after the last of them; a sample's bytes are dropped when its batch is
built and a shard's entry after its last batch. A failed read (connection lost, HTTP 5xx, truncated tar, a
``pipe:`` command exiting non-zero) starts the shard again, up to ``retries`` more times with a growing pause; a
404 is not retried. Then the shard is named: the run stops (:class:`ShardReadError`), or with ``skip_bad_shards``
its samples are left out, a warning names it and a JSON line goes to ``bad_shards_file``.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import threading
import time

from faceid.train import shard_io
from faceid.train.shard_io import ShardReadError

RETRIES = 3  # further attempts after a failed read of a shard
RETRY_DELAY = 0.5  # seconds before the first retry; doubled each time
log = logging.getLogger("faceid.shards")


class StreamReader:
    def __init__(self, retries: int = RETRIES, skip_bad_shards: bool = False, bad_shards_file=None):
        self.retries, self.skip = int(retries), bool(skip_bad_shards)
        self.bad_shards_file = None if bad_shards_file is None else str(bad_shards_file)

    def _read_once(self, loc: str, keys: set[int], exts) -> dict[int, dict[str, bytes]]:
        got: dict[int, dict[str, bytes]] = {}
        last = max(keys)
        with shard_io.open_stream(loc) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = os.path.basename(m.name).partition(".")
                g = int(key)
                if g > last:  # the writer stores samples in order: the rest is not needed
                    break
                if g in keys and (exts is None or ext in exts):
                    got.setdefault(g, {})[ext] = tar.extractfile(m).read()
        missing = sorted(g for g in keys if "json" not in got.get(g, {}))
        if missing:
            raise ShardReadError(
                f"{len(missing)} sample(s) missing, first {missing[0]:09d} (truncated or wrong shard)"
            )
        return got

    def read(self, loc: str, keys: set[int], exts=None, strict: bool = False, context=None):
        """``{sample: {ext: bytes}}`` for ``keys`` of the shard at ``loc``; ``None`` if it was skipped."""
        error, attempts = None, 0
        for attempt in range(self.retries + 1):
            attempts = attempt + 1
            try:
                return self._read_once(loc, keys, exts)
            except (OSError, EOFError, ValueError, tarfile.TarError) as e:  # ShardReadError is a ValueError
                error = e
                if shard_io.permanent(e) or attempt == self.retries:
                    break
                log.warning(f"shard {loc}: {e}; retrying ({attempt + 1}/{self.retries})")
                time.sleep(RETRY_DELAY * 2**attempt)
        message = f"shard {loc} unreadable after {attempts} attempt(s): {error}"
        if strict or not self.skip:
            raise ShardReadError(f"{message}. Check it (or the server), or pass --skip_bad_shards") from error
        rank, epoch, worker = context or (0, 0, 0)
        log.warning(f"{message}; skipped ({len(keys)} samples)")
        if self.bad_shards_file:
            line = {"shard": loc, "error": str(error), "attempts": attempts, "samples_skipped": len(keys),
                    "rank": rank, "epoch": epoch, "worker": worker}  # fmt: skip
            os.makedirs(os.path.dirname(os.path.abspath(self.bad_shards_file)), exist_ok=True)
            # One short line per append: lines from several workers do not interleave.
            with open(self.bad_shards_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return None

    def recorded(self) -> list[str]:
        """Distinct shards in ``bad_shards_file``, in first-seen order."""
        if not self.bad_shards_file or not os.path.exists(self.bad_shards_file):
            return []
        with open(self.bad_shards_file, encoding="utf-8") as f:
            names = [json.loads(line)["shard"] for line in f if line.strip()]
        return list(dict.fromkeys(names))


class _Prefetch:
    """One shard read in a daemon thread (socket and pipe reads release the GIL: the next shard arrives while
    this one's images are decoded)."""

    def __init__(self, fn, *args):
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            self.value = fn(*args)
        except BaseException as e:  # handed to the worker, which raises it with the shard's name
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


class WorkerStore:
    """The samples one worker's ``batches`` (lists of ``(shard, sample)``) take, read shard by shard; the next
    shard is read ahead while the current one is used."""

    def __init__(self, reader: StreamReader, shards: list[dict], batches: list, context=None, prefetch=True):
        self.reader, self.shards, self.batches, self.context = reader, shards, batches, context
        self.need: dict[int, set[int]] = {}
        self.last_use: dict[int, int] = {}
        for n, batch in enumerate(batches):
            for s, g in batch:
                self.need.setdefault(s, set()).add(g)
                self.last_use[s] = n
        self.order = list(self.need)  # shards in order of first use
        self.prefetch = prefetch
        self.pending: dict[int, _Prefetch] = {}
        self.started: set[int] = set()
        self.loaded: dict[int, dict | None] = {}
        self.bad: list[int] = []

    def _read(self, s: int):
        return self.reader.read(self.shards[s]["loc"], self.need[s], context=self.context)

    def _load(self, s: int) -> None:
        job = self.pending.pop(s, None)
        self.started.add(s)
        self.loaded[s] = job.result() if job is not None else self._read(s)
        if self.loaded[s] is None:
            self.bad.append(s)
        nxt = self.order.index(s) + 1
        if self.prefetch and nxt < len(self.order):
            t = self.order[nxt]
            if t not in self.started:
                self.started.add(t)
                self.pending[t] = _Prefetch(self._read, t)

    def take(self, n: int, keep: bool = False) -> list[tuple[int, int, dict]]:
        """Batch ``n``'s ``(shard, sample, files)`` without the skipped shards' samples; ``keep``: a look-ahead
        that leaves them for the batch's own turn."""
        out = []
        for s, g in self.batches[n]:
            if s not in self.loaded:
                self._load(s)
            if self.loaded[s] is not None:
                files = self.loaded[s][g] if keep else self.loaded[s].pop(g)
                out.append((s, g, files))
        if keep:
            return out
        for s in [s for s in self.loaded if self.last_use[s] <= n and self.loaded[s] is not None]:
            del self.loaded[s]
        return out

    def bad_names(self) -> list[str]:
        return [self.shards[s]["loc"] for s in self.bad]
