"""Face analysis in one place: what ``get_face_info.py``, inference, training-data preparation and evaluation use.

:class:`FaceAnalyzer` loads ``root/models/<name>`` (antelopev2) the way insightface's ``FaceAnalysis`` does (its own
``ModelRouter`` and model classes, so the routing and the numbers are insightface's), quietly, on the right
providers, each ONNX session built once, and adds what the official scripts lack:

* the largest face by real bbox area ``(x2 - x1) * (y2 - y1)`` (the official snippets' key
  ``(b[2]-b[0])*b[3]-b[1]`` has an operator-precedence bug and can pick a smaller face);
* retry at smaller detector sizes when nothing is found (SCRFD misses faces that fill a close crop at 640);
* a :class:`FaceResult` carrying the raw and normalised embedding, keypoints, bbox, score, the number of faces,
  every face's bbox and the ``frame`` (W, H) the coordinates refer to;
* batched recognition for dataset mode (:meth:`FaceAnalyzer.analyze_many`): detection per image, then one ONNX run
  over the aligned 112×112 crops of many images (``norm_crop`` + ArcFaceONNX ``blobFromImages`` semantics).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from faceid.face.detection import Detector
from faceid.face.images import load_image, to_bgr
from faceid.schema import EMBEDDING_DIM
from faceid.weight_files import check_onnx_folder

# skimage (used by insightface's norm_crop) warns on every call in recent versions.
warnings.filterwarnings("ignore", message=r".*estimate.*deprecated", category=FutureWarning)

DEFAULT_NAME = "antelopev2"
DEFAULT_MODULES = ("detection", "recognition")
# Detector sizes tried after ``det_size`` when no face is found (only those smaller than det_size are used).
DEFAULT_RETRY_SIZES = (640, 480, 320, 256)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class NoFaceModelError(FileNotFoundError):
    """The face-analysis pack is missing or lacks a detector; the message says how to get it."""


def cuda_usable() -> bool:
    """True only when a CUDA device really exists (onnxruntime-gpu lists CUDA even on machines without one).

    Asks the driver (``libcuda``: ``cuInit`` + ``cuDeviceGetCount``) without importing torch; if the driver library
    is absent there is no usable GPU."""
    import ctypes

    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return False
    try:
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except Exception:  # unexpected driver: let torch decide if it is installed
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:
            return False


def choose_providers(device_id: int = 0) -> tuple[list[str], list[dict], int]:
    """``(providers, provider_options, ctx_id)``: CUDA (on ``device_id``) + CPU when CUDA is offered by onnxruntime
    and usable, else CPU only (and ``ctx_id = -1``)."""
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers() and cuda_usable():
        return [CUDA, CPU], [{"device_id": str(device_id)}, {}], device_id
    return [CPU], [{}], -1


def _family(taskname: str) -> str:
    if taskname.startswith("landmark"):
        return "landmark"
    return "attribute" if taskname == "genderage" or taskname.startswith("attribute") else taskname


def router_task(input_shapes: list, num_outputs: int) -> str | None:
    """The kind of model insightface's ``ModelRouter`` makes of this interface (its rule, in its order):
    ``detection``, ``landmark`` (``landmark_3d_68``, ``landmark_2d_106``), ``attribute`` (``genderage``),
    ``inswapper`` or ``recognition``; ``None`` where it would make none or the interface is not one it reads."""
    if not input_shapes or len(input_shapes[0]) != 4:
        return None
    shape = input_shapes[0]
    if num_outputs >= 5:
        return "detection"
    if shape[2] == 192 and shape[3] == 192:
        return "landmark"
    if shape[2] == 96 and shape[3] == 96:
        return "attribute"
    if len(input_shapes) == 2 and shape[2] == 128 and shape[3] == 128:
        return "inswapper"
    if shape[2] == shape[3] and isinstance(shape[2], int) and shape[2] >= 112 and shape[2] % 16 == 0:
        return "recognition"
    return None


def largest_face_index(bboxes) -> int:
    """Index of the face with the largest ``(x2 - x1) * (y2 - y1)``."""
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    return int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))


@dataclass
class FaceResult:
    """The chosen (largest) face of one image; coordinates are in the pixels of ``frame`` (W, H)."""

    embedding: np.ndarray  # [512] float32, raw recognizer output (what InstantID feeds the Resampler)
    normed_embedding: np.ndarray  # [512] float32, L2-normalised (for similarity)
    kps: np.ndarray  # [5, 2] float32
    bbox: np.ndarray  # [4] float32 x1, y1, x2, y2
    det_score: float
    num_faces: int
    frame: tuple[int, int]
    all_bboxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [N, 4]
    all_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))  # [N]
    det_size: int = 0

    @property
    def face_area_ratio(self) -> float:
        """Area of the chosen bbox (clipped to the frame) over the image area."""
        w, h = self.frame
        x1, y1, x2, y2 = np.clip(self.bbox, [0, 0, 0, 0], [w, h, w, h]).astype(np.float64)
        return float(max(0.0, x2 - x1) * max(0.0, y2 - y1) / max(1, w * h))

    def to_face_info(self) -> dict:
        """The dict ``faceid.face.face_info.save_face_info`` writes (MFaceTech keys plus bbox/score/frame)."""
        return {
            "embedding": self.embedding.astype(np.float32),
            "kps": self.kps.astype(np.float32),
            "bbox": self.bbox.astype(np.float32),
            "det_score": np.float32(self.det_score),
            "frame": np.asarray(self.frame, dtype=np.int64),
        }


@dataclass
class NoFace:
    """No face found; falsy, with a human-readable ``reason``."""

    reason: str
    frame: tuple[int, int]
    tried_sizes: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return False


@dataclass
class Detections:
    bboxes: np.ndarray  # [N, 4]
    scores: np.ndarray  # [N]
    kpss: np.ndarray  # [N, 5, 2]
    det_size: int
    tried_sizes: tuple[int, ...]


@dataclass
class Prepared:
    """Detected and aligned, waiting for recognition (:meth:`FaceAnalyzer.finish`)."""

    det: Detections
    index: int
    frame: tuple[int, int]
    crop: np.ndarray | None


def _as_bgr(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return to_bgr(load_image(image))
    if isinstance(image, Image.Image):
        return to_bgr(image)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 BGR array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 BGR array, got {arr.dtype}")
    return np.ascontiguousarray(arr[:, :, :3])


class FaceAnalyzer:
    """insightface's models of ``root/models/<name>`` (as ``FaceAnalysis`` loads them), set up once, used everywhere.

    ``det_size`` is the first detector size; ``retry_sizes`` the smaller sizes tried in order when it finds nothing
    (default: the sizes of :data:`DEFAULT_RETRY_SIZES` below ``det_size``; ``()`` disables retries).
    ``providers=None`` picks CUDA (device ``device_id``, default ``LOCAL_RANK``) only when it is really usable.
    """

    def __init__(
        self,
        root: str | os.PathLike = ".",
        name: str = DEFAULT_NAME,
        det_size: int = 640,
        providers: list[str] | None = None,
        allowed_modules=DEFAULT_MODULES,
        det_thresh: float = 0.5,
        retry_sizes=None,
        device_id: int | None = None,
        verbose: bool = False,
        rec_batch_size: int = 64,
        intra_op_threads: int | None = None,
    ):
        self.root = Path(root)
        self.model_dir = self.root / "models" / name
        if not glob.glob(str(self.model_dir / "*.onnx")):
            raise NoFaceModelError(
                f"no face-analysis models in {self.model_dir}: run `python download.py` (real antelopev2) or "
                f"`python download.py --tiny DIR` (tests), or pass the folder that holds models/{name}"
            )
        interfaces = check_onnx_folder(self.model_dir)
        if device_id is None:
            device_id = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if providers is None:
            providers, provider_options, ctx_id = choose_providers(device_id)
        else:
            use_cuda = CUDA in providers
            provider_options = [({"device_id": str(device_id)} if p == CUDA else {}) for p in providers]
            ctx_id = device_id if use_cuda else -1
        self.providers = list(providers)
        self.ctx_id = ctx_id
        self.det_size = int(det_size if np.isscalar(det_size) else det_size[0])
        if retry_sizes is None:
            retry_sizes = [s for s in DEFAULT_RETRY_SIZES if s < self.det_size]
        self.sizes = (self.det_size, *[int(s) for s in retry_sizes if int(s) != self.det_size])
        self.det_thresh = det_thresh
        self.rec_batch_size = max(1, int(rec_batch_size))
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            self.models = self._load_models(allowed_modules, provider_options, intra_op_threads, interfaces)
        if "detection" not in self.models:
            raise NoFaceModelError(f"{self.model_dir}: no detection model found among the .onnx files")
        self.det_model = self.models["detection"]
        self.rec_model = self.models.get("recognition")
        self.detector = Detector(self.det_model) if Detector.supports(self.det_model) else None
        if self.detector is not None:
            self.detector.blob_table(self.det_size, self.det_size)  # here, not in each decode thread
        # Each session is built once, on its final providers; ctx_id < 0 would make prepare() rebuild it for CPU.
        for task, model in self.models.items():
            if task == "detection":
                model.prepare(
                    max(ctx_id, 0), input_size=(self.det_size, self.det_size), det_thresh=det_thresh
                )
            else:
                model.prepare(max(ctx_id, 0))
        batch_dim = self.rec_model.input_shape[0] if self.rec_model is not None else 1
        self._rec_batched = not isinstance(batch_dim, int) or batch_dim != 1

    def _load_models(self, allowed_modules, provider_options, threads: int | None, interfaces=None) -> dict:
        """insightface ``FaceAnalysis``'s loading (its ``ModelRouter`` on each ``*.onnx`` in name order, the first
        model of each task kept), with every session created once and only where it is used: FaceAnalysis cannot
        pass session options, so setting threads meant a second session per model, and its CPU ``prepare`` a third
        for the detector; and it opens a session on every file of the pack to find its task, the landmark and
        attribute models too (the real pack's 1k3d68 alone is 143 MB). A file whose
        parsed interface (``interfaces``, from the weight check) routes it to a task not wanted, or already
        taken, is skipped without a session. ``threads``: intra-op threads and no spinning, for throughput with
        several images in flight (dataset mode on CPU)."""
        import onnxruntime
        from insightface.model_zoo.model_zoo import ModelRouter

        onnxruntime.set_default_logger_severity(3)
        opts = onnxruntime.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        allowed = set(allowed_modules) if allowed_modules else None
        families = {_family(a) for a in allowed} if allowed is not None else None
        interfaces = {Path(k).name: v for k, v in (interfaces or {}).items()}
        models: dict = {}
        for onnx_file in sorted(glob.glob(str(self.model_dir / "*.onnx"))):
            seen = interfaces.get(Path(onnx_file).name)
            task = router_task(*seen) if seen else None
            if task is not None and ((families is not None and task not in families) or task in models):
                continue
            model = ModelRouter(onnx_file).get_model(
                providers=self.providers, provider_options=provider_options, sess_options=opts
            )
            if model is None:
                print("model not recognized:", onnx_file)
            elif (allowed is None or model.taskname in allowed) and model.taskname not in models:
                print(
                    "find model:",
                    onnx_file,
                    model.taskname,
                    model.input_shape,
                    model.input_mean,
                    model.input_std,
                )
                models[model.taskname] = model
        return models

    # ----------------------------------------------------------------------------------------------- detection
    def detect(self, bgr: np.ndarray) -> Detections:
        """All faces of a BGR image, trying ``self.sizes`` in order until one finds something."""
        tried = []
        for size in self.sizes:
            tried.append(size)
            if self.detector is not None:
                bboxes, kpss = self.detector.detect(bgr, size)
            else:
                bboxes, kpss = self.det_model.detect(bgr, input_size=(size, size), max_num=0)
            if len(bboxes):
                kpss = np.zeros((len(bboxes), 5, 2), np.float32) if kpss is None else kpss
                return Detections(
                    bboxes[:, :4].astype(np.float32),
                    bboxes[:, 4].astype(np.float32),
                    kpss.astype(np.float32),
                    size,
                    tuple(tried),
                )
        empty = np.zeros((0, 4), np.float32)
        return Detections(empty, np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32), 0, tuple(tried))

    def align(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """The aligned crop the recognizer sees (insightface ``norm_crop``)."""
        from insightface.utils import face_align

        return face_align.norm_crop(bgr, landmark=kps, image_size=self.rec_model.input_size[0])

    def embed_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        """Raw embeddings ``[N, 512]`` for aligned BGR crops, in batches (ArcFaceONNX ``get_feat`` semantics)."""
        if not crops:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        step = self.rec_batch_size if self._rec_batched else 1
        outs = [self.rec_model.get_feat(list(crops[i : i + step])) for i in range(0, len(crops), step)]
        return np.concatenate(outs, axis=0).astype(np.float32).reshape(len(crops), -1)

    # ------------------------------------------------------------------------------------------------ analysis
    def _pick(self, bgr: np.ndarray):
        h, w = bgr.shape[:2]
        det = self.detect(bgr)
        if not len(det.bboxes):
            sizes = ", ".join(map(str, det.tried_sizes))
            return NoFace(f"no face detected (det_size tried: {sizes})", (w, h), det.tried_sizes), None
        i = largest_face_index(det.bboxes)
        return det, i

    def _result(self, det: Detections, i: int, frame, emb: np.ndarray) -> FaceResult:
        emb = np.asarray(emb, np.float32).reshape(-1)
        norm = float(np.linalg.norm(emb))
        return FaceResult(
            embedding=emb,
            normed_embedding=emb / norm if norm > 0 else emb.copy(),
            kps=det.kpss[i].reshape(5, 2),
            bbox=det.bboxes[i].reshape(4),
            det_score=float(det.scores[i]),
            num_faces=len(det.bboxes),
            frame=frame,
            all_bboxes=det.bboxes,
            all_scores=det.scores,
            det_size=det.det_size,
        )

    def analyze_full(self, image) -> FaceResult | NoFace:
        """:class:`FaceResult` of the largest face, or a falsy :class:`NoFace` with the reason."""
        return self.analyze_many([image])[0]

    def analyze(self, image) -> FaceResult | None:
        """Largest face of ``image`` (PIL RGB, BGR uint8 array, or path) or ``None`` when there is none."""
        result = self.analyze_full(image)
        return result if result else None

    def prepare(self, image) -> Prepared | NoFace:
        """Detection, choice of the largest face and alignment (thread-safe: call it from decode workers);
        finish with :meth:`finish`, which runs the batched recognition."""
        bgr = _as_bgr(image)
        det, i = self._pick(bgr)
        if i is None:
            return det
        crop = self.align(bgr, det.kpss[i]) if self.rec_model is not None else None
        return Prepared(det, i, (bgr.shape[1], bgr.shape[0]), crop)

    def finish(self, prepared) -> list[FaceResult | NoFace]:
        """One batched recognition over the crops of :meth:`prepare` results; one result each, in order."""
        crops = [p.crop for p in prepared if p and p.crop is not None]
        embs = iter(self.embed_crops(crops))
        out = []
        for p in prepared:
            if not p:
                out.append(p)
                continue
            emb = next(embs) if p.crop is not None else np.zeros(EMBEDDING_DIM, np.float32)
            out.append(self._result(p.det, p.index, p.frame, emb))
        return out

    def analyze_many(self, images) -> list[FaceResult | NoFace]:
        """Analyze several images with one batched recognition pass; one result per image, in order."""
        return self.finish([self.prepare(image) for image in images])
