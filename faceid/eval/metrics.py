"""Image metrics for evaluation: Face Sim (ArcFace cosine), CLIP-T and CLIP-I, without torchvision.

* ``cosine`` / ``clip_score`` (``100 * max(cos, 0)``, the CLIP-T/CLIP-I convention);
* :class:`ClipScorer`: L2-normalised CLIP image/text embeddings from a transformers ``CLIPModel`` folder (or hub
  id), image preprocessing done with PIL/numpy (:func:`clip_preprocess`, same as ``CLIPImageProcessor``);
* :class:`FaceEmbedder`: normalised embedding of the largest face via ``faceid.face.analysis.FaceAnalyzer``.

The evaluation loop, inputs and reports are in :mod:`faceid.eval.scoring`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"

# --------------------------------------------------------------------------------------------------- math


def cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.dot(a, b) / (na * nb))


def clip_score(a, b) -> float:
    """CLIP-T/CLIP-I convention: ``100 * max(cos, 0)``."""
    return 100.0 * max(cosine(a, b), 0.0)


# --------------------------------------------------------------------------------------------------- CLIP


def clip_preprocess(
    image: Image.Image, size: int = 224, crop: int | None = None, mean=CLIP_MEAN, std=CLIP_STD
) -> np.ndarray:
    """CLIP preprocessing without torchvision: shortest side → ``size`` (bicubic), centre crop, normalise.

    Matches ``CLIPImageProcessor`` (the resize keeps ``int(size * long / short)`` for the long side).
    Returns a ``[3, crop, crop]`` float32 array.
    """
    crop = crop or size
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    if top < 0 or left < 0:  # smaller than the crop: pad with zeros like CLIPImageProcessor
        canvas = Image.new("RGB", (max(new_w, crop), max(new_h, crop)))
        canvas.paste(image, (max(-left, 0), max(-top, 0)))
        image, top, left = canvas, max(top, 0), max(left, 0)
    image = image.crop((left, top, left + crop, top + crop))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_preprocessor_config(model_path: str) -> dict:
    p = Path(model_path) / "preprocessor_config.json"
    if p.is_file():
        return json.loads(p.read_text(encoding="utf-8"))
    return {}


def _size_value(v, default: int) -> int:
    if isinstance(v, dict):
        return int(v.get("shortest_edge") or v.get("height") or default)
    return int(v) if v else default


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised numpy) from a transformers ``CLIPModel`` folder or hub id."""

    def __init__(
        self, model_path: str = DEFAULT_CLIP_MODEL, device: str = "cpu", dtype=None, batch_size: int = 8
    ):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        self.torch = torch
        self.device = device
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(model_path, **({"dtype": dtype} if dtype is not None else {}))
        self.model.to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(model_path)
        cfg = _read_preprocessor_config(model_path)
        image_size = int(self.model.config.vision_config.image_size)
        self.size = _size_value(cfg.get("size"), image_size)
        self.crop = _size_value(cfg.get("crop_size"), image_size)
        self.mean = tuple(cfg.get("image_mean", CLIP_MEAN))
        self.std = tuple(cfg.get("image_std", CLIP_STD))
        self.max_length = int(
            min(self.model.config.text_config.max_position_embeddings, self.tokenizer.model_max_length or 77)
        )
        self.name = os.fspath(model_path)

    def _normalise(self, feats) -> np.ndarray:
        feats = feats.float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return feats.cpu().numpy()

    def image_embeds(self, images: Sequence[Image.Image]) -> np.ndarray:
        torch = self.torch
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [
                clip_preprocess(im, self.size, self.crop, self.mean, self.std)
                for im in images[i : i + self.batch_size]
            ]
            pixels = torch.from_numpy(np.stack(batch)).to(self.device, dtype=self.model.dtype)
            with torch.inference_mode():
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                out.append(self._normalise(self.model.visual_projection(pooled)))
        dim = self.model.config.projection_dim
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                pooled = self.model.text_model(
                    input_ids=tok["input_ids"].to(self.device),
                    attention_mask=tok["attention_mask"].to(self.device),
                ).pooler_output
                out.append(self._normalise(self.model.text_projection(pooled)))
        dim = self.model.config.projection_dim
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


# --------------------------------------------------------------------------------------------------- faces


def make_face_analyzer(
    face_root: str, face_model_name: str | None = None, det_size: int = 640, providers=None
):
    """Build the :class:`faceid.face.analysis.FaceAnalyzer` used for Face Sim.

    ``face_root`` is insightface's root (the pack is ``face_root/models/<face_model_name>``), or the pack folder
    itself (``.../models/antelopev2``, any folder with the ``.onnx`` files; its name is then the model name).
    """
    from faceid.face.analysis import DEFAULT_NAME, FaceAnalyzer

    root, name = Path(face_root), face_model_name or DEFAULT_NAME
    if not (root / "models" / name).is_dir() and any(root.glob("*.onnx")) and root.parent.name == "models":
        root, name = root.parent.parent, root.name
    return FaceAnalyzer(os.fspath(root), name=name, det_size=det_size, providers=providers)


class FaceEmbedder:
    """Normalised ArcFace embedding of the largest face (or None) with a per-path cache for references."""

    def __init__(self, analyzer):
        self.analyzer = analyzer
        self._cache: dict[str, tuple[np.ndarray | None, int]] = {}

    @staticmethod
    def _result(face) -> tuple[np.ndarray | None, int]:
        if not face:  # None or a falsy NoFace
            return None, 0
        emb = getattr(face, "normed_embedding", None)
        if emb is None:
            emb = np.asarray(face.embedding, np.float64)
            emb = emb / max(np.linalg.norm(emb), 1e-12)
        return np.asarray(emb, np.float64), int(getattr(face, "num_faces", 1) or 1)

    def embed(self, image: Image.Image, key: str | None = None) -> tuple[np.ndarray | None, int]:
        """``(normalised embedding or None, number of faces)``; cached under ``key`` when given."""
        if key is not None and key in self._cache:
            return self._cache[key]
        result = self._result(self.analyzer.analyze(image))
        if key is not None:
            self._cache[key] = result
        return result

    def embed_many(self, images: Sequence[Image.Image]) -> list[tuple[np.ndarray | None, int]]:
        """Like :meth:`embed` for a batch; uses the analyzer's batched recognition when it has one."""
        many = getattr(self.analyzer, "analyze_many", None)
        if many is None:
            return [self.embed(im) for im in images]
        return [self._result(f) for f in many(list(images))]
