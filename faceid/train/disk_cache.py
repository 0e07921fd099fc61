"""Precomputed conditioning on disk: VAE posteriors per aspect bucket and crop, and SDXL text embeddings, written
by ``precompute_cache.py`` and read by training (``--precomputed_cache DIR``) instead of decoding images and
running the VAE and the text encoders.

What is cached, and why it is exact:

* **Latents** — the VAE posterior ``(mean, logvar)`` of each item's *centre crop in its bucket* (the crop
  ``plan_crop`` makes without ``--random_crop``; bucket = nearest SDXL aspect bucket with
  ``--aspect_ratio_buckets``, else the square ``--resolution``). Random crops are not cached: training with a cache
  refuses ``--random_crop``. **Flip**: with ``--flip both`` the mirrored crop is encoded too (the VAE of a mirrored
  image is not a mirrored latent), and training may use ``--random_flip P``; with ``--flip none`` it may not.
  The posterior (not a sample) is stored, so the latent is drawn from the training step's own generator.
* **Text** — for every distinct caption, plus ``""`` (what a CFG text drop encodes): both encoders' penultimate
  hidden states concatenated (``[77, 2048]`` for SDXL) and the pooled embedding, in the text encoders' dtype.

Both paths encode one sample at a time (``faceid.train.model``), so a run with the cache follows the run without
it bit for bit on CPU (same crops, same noise). Sizes at 1024 px: 512 KiB of latents per item and view (fp32),
~308 KiB per caption (fp16); a FaceID-6M-size set therefore needs terabytes — cache latents only
(``--what latents``) or a subset when disk is short.

Layout (resumable; the part engine of ``get_face_info.py``, :mod:`faceid.prep.parts`)::

    CACHE/manifest.json                          what it was built from (below); a cache built otherwise is refused
    CACHE/parts/w002-r00001-000007.safetensors   tensors "lat/<item id>/<0|1 flipped>", "txt/<sha1>/embeds|pooled"
    CACHE/parts/w002-r00001-000007.jsonl         their keys (written last: the commit point)
    CACHE/parts/done-w002-r00001.json            rank finished

The manifest records the source (index or shard folder and item count), resolution, buckets, crop policy, flip
policy, what is cached, and for the VAE and the text encoders their source, dtype and a SHA-256 over their
configuration and weights (tokenizers' vocabularies included).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from faceid.train.errors import TrainingInputError

FORMAT = "instantid-cache-1"
MANIFEST = "manifest.json"
CROP_POLICY = "center"


def text_key(caption: str) -> str:
    return "txt/" + hashlib.sha1(caption.encode("utf-8")).hexdigest()


def latent_key(item_id: str) -> str:
    return f"lat/{item_id}"


def module_fingerprint(module) -> str:
    """SHA-256 over a model's configuration and every tensor (names, dtypes, shapes, bytes) as used."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version",)}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tok.model_max_length]).encode()).hexdigest()


def expected_manifest(enc: dict, source: dict, resolution: int, buckets, flip: str, what: list[str]) -> dict:
    """The manifest a cache for these settings has. ``enc``: :func:`faceid.train.model.load_encoders`'s dict."""
    out = {
        "format": FORMAT,
        "source": source,
        "resolution": int(resolution),
        "buckets": [list(b) for b in buckets] if buckets else None,
        "crop": CROP_POLICY,
        "flip": flip,
        "what": sorted(what),
    }
    if "latents" in what:
        vae = enc["vae"]
        out["vae"] = {"source": str(vae.config._name_or_path), "dtype": str(vae.dtype),
                      "sha256": module_fingerprint(vae)}  # fmt: skip
    if "text" in what:
        te, te2 = enc["text_encoder"], enc["text_encoder_2"]
        h = hashlib.sha256()
        for part in (module_fingerprint(te), module_fingerprint(te2), tokenizer_fingerprint(enc["tokenizer"]),
                     tokenizer_fingerprint(enc["tokenizer_2"])):  # fmt: skip
            h.update(part.encode())
        out["text_encoders"] = {"source": str(te.config._name_or_path), "dtype": str(te.dtype),
                                "sha256": h.hexdigest()}  # fmt: skip
    return json.loads(json.dumps(out))


def differences(built: dict, wanted: dict, prefix: str = "") -> list[str]:
    """``["resolution: cache 64, this run 128", ...]`` (nested fields dotted)."""
    out = []
    for k in sorted(set(built) | set(wanted)):
        a, b = built.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            show = [json.dumps(v)[:120] for v in (a, b)]
            out.append(f"{prefix}{k}: cache {show[0]}, this run {show[1]}")
    return out


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise TrainingInputError(
            f"{cache_dir}: not a precomputed cache (no {MANIFEST}); build it with precompute_cache.py"
        )
    man = json.loads(path.read_text(encoding="utf-8"))
    if man.get("format") != FORMAT:
        raise TrainingInputError(
            f"{path}: format {man.get('format')!r}, expected {FORMAT!r}; rebuild the cache"
        )
    return man


def check_manifest(built: dict, wanted: dict, cache_dir, hint: str) -> None:
    """Refuse a cache whose manifest differs from what this run needs, naming every difference."""
    diff = differences({k: v for k, v in built.items() if k in wanted}, wanted)
    if diff:
        raise TrainingInputError(
            f"{cache_dir} was built with other settings:\n  " + "\n  ".join(diff) + f"\n{hint}"
        )


class DiskCache:
    """Read side: key → tensor, over the committed part files (safetensors, memory-mapped, opened lazily in
    each DataLoader worker)."""

    def __init__(self, cache_dir: str | os.PathLike):
        from faceid.prep.parts import PartStore
        from faceid.weight_files import check_cache_parts

        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        store = PartStore(self.dir)
        self.where: dict[str, str] = {}
        for _, path in store.part_files():
            st = path.with_suffix(".safetensors").name
            for rec in store.read_part(path):
                self.where[rec["key"]] = st
        check_cache_parts([self.dir / "parts" / f for f in sorted(set(self.where.values()))], self.dir)
        self._open: dict[str, object] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}  # file handles stay in the process that opened them
        return state

    def _get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = name.rsplit("/", 1)[0]
        file = self.where[key]
        if file not in self._open:
            self._open[file] = safe_open(str(self.dir / "parts" / file), framework="pt")
        return self._open[file].get_tensor(name)

    def latent(self, item_id: str, flip: bool) -> torch.Tensor:
        return self._get(f"{latent_key(item_id)}/{int(bool(flip))}")

    def text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        k = text_key(caption)
        return self._get(f"{k}/embeds"), self._get(f"{k}/pooled")

    @property
    def has_latents(self) -> bool:
        return "latents" in self.manifest["what"]

    @property
    def has_text(self) -> bool:
        return "text" in self.manifest["what"]

    def check_complete(self, item_ids, captions) -> None:
        """Every item and caption this run draws is in the cache, or a message naming the first missing."""
        need = []
        if self.has_latents:
            need += [latent_key(i) for i in item_ids]
        if self.has_text:
            need += [text_key(c) for c in {*captions, ""}]
        missing = [k for k in need if k not in self.where]
        if missing:
            raise TrainingInputError(
                f"{self.dir}: {len(missing)} of {len(need)} entries are not in the cache (e.g. {missing[0]}); "
                "rerun precompute_cache.py with the same arguments to finish it"
            )
