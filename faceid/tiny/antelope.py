"""A tiny, deterministic stand-in for the antelopev2 pack, for offline tests and benchmarks.

``build_tiny_antelopev2(model_dir)`` writes two ONNX files that insightface 0.7.3's ``model_zoo.get_model`` routes
unmodified, exactly like the real pack:

* ``scrfd_10g_bnkps.onnx`` — the SCRFD signature: one input ``[1, 3, H, W]`` with dynamic H/W (so ``prepare``
  takes ``det_size``), nine outputs (scores, bboxes, kps for strides 8, 16, 32; two anchors per location;
  ``[K*2, 1]``, ``[K*2, 4]``, ``[K*2, 10]``). With nine outputs insightface picks ``RetinaFace`` with
  ``fmc=3``, ``use_kps=True``, ``input_mean=127.5``, ``input_std=128``. The "face" it finds is a bright
  axis-aligned rectangle (mean of the channels above :data:`BRIGHT_LEVEL` on a darker background): for every anchor
  inside one, run lengths of bright pixels to the left/right/up/down (computed by pointer doubling, so in log
  steps) give the rectangle's box; the five keypoints are insightface's ``arcface_dst`` template scaled into the
  box. Several rectangles give several faces, a dark image none. Like real SCRFD on close crops, a rectangle wider
  or taller than :data:`MAX_FACE_PX` pixels of the detector input is *not* found, so a face filling the frame is
  only detected after retrying at a smaller ``det_size``.
* ``glintr100.onnx`` — a ``[N, 3, 112, 112] -> [N, 512]`` recognizer: the miniature world's CNN trained to tell
  its persons apart (``faceid/tiny/world.py``; Conv/Relu/Flatten/Gemm) or, without those weights, 8×8 average
  pooling and a fixed random projection (seed 0). Node names avoid ``Sub``/``Mul`` so insightface reads ``input_mean = input_std = 127.5``,
  as for the real model. The same aligned face gives the same embedding; different colours/textures differ.

Both files are built with ``onnx.helper`` in well under a second and are byte-for-byte reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from faceid.face.regions import ARCFACE_TEMPLATE
from faceid.schema import EMBEDDING_DIM
from ip_adapter.utils import atomic_path

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
OPSET = 13
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
# A pixel belongs to a face when the mean of its channels is above this level (0..255).
BRIGHT_LEVEL = 140.0
# Detector-input size limits of a face (pixels); larger faces need a smaller det_size (retry).
MAX_FACE_PX = 400
MIN_FACE_PX = 8
# Run lengths are computed up to 2**DOUBLING_STEPS pixels (must exceed MAX_FACE_PX).
DOUBLING_STEPS = 9
REC_POOL = 8
_BIG = np.iinfo(np.int64).max


class _Graph:
    """Minimal helper to add nodes/constants with unique names."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix = prefix
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}_{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def ints(self, values) -> str:
        return self.const(values, np.int64, "i")

    def slice(self, x, starts, ends, axes, steps) -> str:
        return self.op("Slice", [x, self.ints(starts), self.ints(ends), self.ints(axes), self.ints(steps)])

    def flag(self, cmp: str, a, b) -> str:
        return self.op("Cast", [self.op(cmp, [a, b])], to=TensorProto.FLOAT)


def _run_length(g: _Graph, mask: str, axis: int, backward: bool) -> str:
    """Length of the run of ones containing each pixel, counted towards the start (``backward``) or the end of
    ``axis``, including the pixel itself (0 on dark pixels). Pointer doubling: ``DOUBLING_STEPS`` steps."""
    run = mask
    for k in range(DOUBLING_STEPS):
        p = 2**k
        pads = [0] * 8
        if backward:  # value at x - p
            pads[axis] = p
            padded = g.op("Pad", [run, g.ints(pads), g.const(0.0)])
            shifted = g.slice(padded, [0], [-p], [axis], [1])
        else:  # value at x + p
            pads[axis + 4] = p
            cut = g.slice(run, [p], [_BIG], [axis], [1])
            shifted = g.op("Pad", [cut, g.ints(pads), g.const(0.0)])
        full = g.flag("Equal", run, g.const(float(p)))
        run = g.op("Add", [run, g.op("Mul", [full, shifted])])
    return run


def _to_rows(g: _Graph, x: str, channels: int) -> str:
    """[1, C, h, w] → [h*w*NUM_ANCHORS, C] with the anchors of one location consecutive (insightface order)."""
    rows = g.op("Reshape", [g.op("Transpose", [x], perm=[0, 2, 3, 1]), g.ints([-1, channels])])
    return g.op("Reshape", [g.op("Concat", [rows] * NUM_ANCHORS, axis=1), g.ints([-1, channels])])


def build_detector(path: str | os.PathLike, max_face_px: int = MAX_FACE_PX) -> Path:
    g = _Graph("det")
    gray = g.op("ReduceMean", ["input.1"], axes=[1], keepdims=1)
    thr = (BRIGHT_LEVEL - 127.5) / 128.0
    mask = g.flag("Greater", gray, g.const(thr))  # [1,1,H,W]
    # Horizontal runs only on rows that hold anchors (every 8th), vertical runs on every 8th column.
    rows = g.slice(mask, [0], [_BIG], [2], [8])
    cols = g.slice(mask, [0], [_BIG], [3], [8])
    left, right = _run_length(g, rows, 3, True), _run_length(g, rows, 3, False)
    up, down = _run_length(g, cols, 2, True), _run_length(g, cols, 2, False)
    one = g.const(1.0)
    score_outs, bbox_outs, kps_outs = [], [], []
    for s in STRIDES:
        f = s // 8
        lh, rh = (g.slice(t, [0, 0], [_BIG, _BIG], [2, 3], [f, s]) for t in (left, right))
        uv, dv = (g.slice(t, [0, 0], [_BIG, _BIG], [2, 3], [s, f]) for t in (up, down))
        here = g.slice(mask, [0, 0], [_BIG, _BIG], [2, 3], [s, s])
        w = g.op("Sub", [g.op("Add", [lh, rh]), one])
        h = g.op("Sub", [g.op("Add", [uv, dv]), one])
        valid = here
        for side in (w, h):
            valid = g.op("Mul", [valid, g.flag("Less", side, g.const(max_face_px + 0.5))])
            valid = g.op("Mul", [valid, g.flag("Greater", side, g.const(MIN_FACE_PX - 0.5))])
        # Prefer the anchor nearest the centre (all anchors inside give the same box; NMS keeps one).
        off = g.op("Add", [g.op("Abs", [g.op("Sub", [lh, rh])]), g.op("Abs", [g.op("Sub", [uv, dv])])])
        off = g.op("Div", [off, g.op("Add", [g.op("Add", [w, h]), one])])
        score = g.op("Mul", [valid, g.op("Sub", [g.const(0.95), g.op("Mul", [off, g.const(0.3)])])])
        # Second anchor of each location scores 0 (one detection per location).
        srows = g.op("Reshape", [g.op("Transpose", [score], perm=[0, 2, 3, 1]), g.ints([-1, 1])])
        zeros = g.op("Mul", [srows, g.const(0.0)])
        score_outs.append(g.op("Reshape", [g.op("Concat", [srows, zeros], axis=1), g.ints([-1, 1])]))
        inv_s = g.const(1.0 / s)
        dl, dt = g.op("Sub", [lh, one]), g.op("Sub", [uv, one])
        dist = g.op("Concat", [dl, dt, rh, dv], axis=1)
        bbox_outs.append(_to_rows(g, g.op("Mul", [dist, inv_s]), 4))
        # Interleaved x0, y0, x1, y1, ...: kps = cw * w + ch * h - ex * dl - ey * dt (offsets from the anchor).
        cw, ch, ex, ey = (np.zeros((1, 10, 1, 1), np.float32) for _ in range(4))
        cw[0, 0::2, 0, 0] = ARCFACE_TEMPLATE[:, 0] / 112.0
        ch[0, 1::2, 0, 0] = ARCFACE_TEMPLATE[:, 1] / 112.0
        ex[0, 0::2] = 1.0
        ey[0, 1::2] = 1.0
        terms = [g.op("Mul", [g.const(c), v]) for c, v in ((cw, w), (ch, h), (ex, dl), (ey, dt))]
        kps = g.op("Sub", [g.op("Add", [terms[0], terms[1]]), g.op("Add", [terms[2], terms[3]])])
        kps_outs.append(_to_rows(g, g.op("Mul", [kps, inv_s]), 10))
    outputs = []
    renamed = []
    for kind, outs, ch in (("score", score_outs, 1), ("bbox", bbox_outs, 4), ("kps", kps_outs, 10)):
        for s, name in zip(STRIDES, outs):
            final = f"{kind}_{s}"
            renamed.append(helper.make_node("Identity", [name], [final], name=f"out_{final}"))
            outputs.append(helper.make_tensor_value_info(final, TensorProto.FLOAT, [None, ch]))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])
    graph = helper.make_graph(g.nodes + renamed, "tiny_scrfd", [inp], outputs, g.inits)
    return _save(graph, path, "tiny SCRFD-signature detector of bright rectangles (tests only)")


WORLD_RECOGNIZER = Path(__file__).resolve().parent / "weights" / "recognizer.safetensors"


def build_world_recognizer(path: str | os.PathLike, weights: str | os.PathLike = WORLD_RECOGNIZER) -> Path:
    """The miniature world's trained recognizer (``faceid/tiny/world.py``) as ONNX with standard ops only
    (Conv, Relu, Flatten, Gemm), so :class:`faceid.face.onnx_module.OnnxModule` runs it as a differentiable module."""
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float32) for k, v in load_file(str(weights)).items()}
    g = _Graph("rec")
    x = "input.1"
    i = 0
    while f"conv{i}.weight" in w:
        x = g.op("Conv", [x, g.const(w[f"conv{i}.weight"], hint="w"), g.const(w[f"conv{i}.bias"], hint="b")],
                 "conv", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # fmt: skip
        x = g.op("Relu", [x], "relu")
        i += 1
    flat = g.op("Flatten", [x], "flat", axis=1)
    fc = g.op(
        "Gemm", [flat, g.const(w["fc.weight"], hint="w"), g.const(w["fc.bias"], hint="b")], "fc", transB=1
    )
    out = helper.make_node("Identity", [fc], ["embedding"], name="out_embedding")
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])
    outp = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING_DIM])
    graph = helper.make_graph(g.nodes + [out], "tiny_arcface", [inp], [outp], g.inits)
    return _save(graph, path, "tiny 112x112 -> 512 recognizer trained on the miniature world's persons")


def build_recognizer(path: str | os.PathLike, seed: int = 0) -> Path:
    g = _Graph("rec")
    feat = 3 * (112 // REC_POOL) ** 2
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((feat, EMBEDDING_DIM)) / np.sqrt(feat)).astype(np.float32)
    pooled = g.op(
        "AveragePool", ["input.1"], "pool", kernel_shape=[REC_POOL, REC_POOL], strides=[REC_POOL] * 2
    )
    flat = g.op("Flatten", [pooled], "flat", axis=1)
    proj = g.op("MatMul", [flat, g.const(weight, hint="w")], "proj")
    out = helper.make_node("Identity", [proj], ["embedding"], name="out_embedding")
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])
    outp = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING_DIM])
    graph = helper.make_graph(g.nodes + [out], "tiny_arcface", [inp], [outp], g.inits)
    return _save(graph, path, "tiny 112x112 -> 512 recognizer (fixed random projection, tests only)")


# The other modules of the real pack (input size, output width), for benchmarks that run "every module".
AUX_MODULES = {"1k3d68.onnx": (192, 3309), "2d106det.onnx": (192, 212), "genderage.onnx": (96, 3)}


def build_aux_module(path: str | os.PathLike, size: int, width: int, seed: int = 0, pool: int = 32) -> Path:
    """A stand-in with a real pack module's signature (insightface routes it as landmark or attribute model):
    ``[N, 3, size, size] -> [N, width]`` through average pooling and a fixed random projection."""
    g = _Graph("aux")
    feat = 3 * (size // pool) ** 2
    weight = (np.random.default_rng(seed).standard_normal((feat, width)) * 0.01).astype(np.float32)
    pooled = g.op("AveragePool", ["data"], "pool", kernel_shape=[pool, pool], strides=[pool, pool])
    flat = g.op("Flatten", [pooled], "flat", axis=1)
    proj = g.op("MatMul", [flat, g.const(weight, hint="w")], "proj")
    out = helper.make_node("Identity", [proj], ["fc1"], name="out_fc1")
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])
    outp = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", width])
    graph = helper.make_graph(g.nodes + [out], "tiny_aux", [inp], [outp], g.inits)
    return _save(graph, path, f"tiny {size}x{size} -> {width} stand-in (benchmarks only)")


def _save(graph, path, doc: str) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="faceid.tiny.models"
    )
    model.ir_version = 8
    model.doc_string = doc
    onnx.checker.check_model(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return path


def build_tiny_antelopev2(
    model_dir: str | os.PathLike, full_pack: bool = False, world: bool | None = None
) -> Path:
    """Write the tiny ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` into ``model_dir`` (e.g.
    ``DIR/models/antelopev2``) and return it. Deterministic; takes well under a second. ``full_pack`` adds
    stand-ins for the pack's three other modules (landmarks 3D/2D, gender-age), as a real download has. ``world``
    (default: when its weights are committed) writes the miniature world's trained recognizer instead of the
    fixed random projection."""
    model_dir = Path(model_dir)
    build_detector(model_dir / DETECTOR_FILE)
    if world is None:
        world = WORLD_RECOGNIZER.is_file()
    if world:
        build_world_recognizer(model_dir / RECOGNIZER_FILE)
    else:
        build_recognizer(model_dir / RECOGNIZER_FILE)
    if full_pack:
        for i, (name, (size, width)) in enumerate(AUX_MODULES.items()):
            build_aux_module(model_dir / name, size, width, seed=i + 1)
    return model_dir


def draw_face(image: np.ndarray, box, color=(230, 220, 200), pattern: int = 0) -> np.ndarray:
    """Paint a tiny-model "face" (a bright rectangle ``box = (x1, y1, x2, y2)``) into an RGB uint8 array in place.

    ``pattern`` selects a deterministic coarse texture (kept bright, so the rectangle stays one face) that makes
    the recognizer's embedding differ between faces of the same colour."""
    x1, y1, x2, y2 = (int(v) for v in box)
    image[y1:y2, x1:x2] = color
    if pattern:
        rng = np.random.default_rng(pattern)
        grid = rng.integers(-60, 1, size=(4, 4, 3))
        hh, ww = y2 - y1, x2 - x1
        for i in range(4):
            for j in range(4):
                ys = slice(y1 + i * hh // 4, y1 + (i + 1) * hh // 4)
                xs = slice(x1 + j * ww // 4, x1 + (j + 1) * ww // 4)
                image[ys, xs] = np.clip(np.asarray(color) + grid[i, j], 0, 255)
    return image
