"""The recognizer ONNX run by torch (identity loss) equals onnxruntime, and lets the gradient reach the input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from faceid.face.onnx_module import OnnxModule


def _iresnet_like(path, seed=0):
    """A two-block IResNet-shaped graph: Conv, BatchNormalization, PRelu, residual Add, Flatten, Gemm, BN on the
    512-d features (glintr100's operators), with asymmetric padding and a stride."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape, scale=0.2):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def bn(x, c, out):
        nodes.append(helper.make_node("BatchNormalization", [x, w(out + "_s", c), w(out + "_b", c),
                                      w(out + "_m", c), _pos(out + "_v", c)], [out], epsilon=1e-5))  # fmt: skip
        return out

    def _pos(name, *shape):
        inits.append(numpy_helper.from_array((rng.random(shape) + 0.5).astype(np.float32), name))
        return name

    nodes.append(helper.make_node("Sub", ["x", w("mean", 1, 3, 1, 1)], ["x0"]))
    # asymmetric padding with a stride, as some exporters write it
    nodes.append(
        helper.make_node("Conv", ["x0", w("c1", 8, 3, 3, 3)], ["a"], pads=[0, 0, 1, 1], strides=[2, 2])
    )
    bn("a", 8, "a_bn")
    nodes.append(helper.make_node("PRelu", ["a_bn", w("p1", 8, 1, 1)], ["a_p"]))
    nodes.append(
        helper.make_node("Conv", ["a_p", w("c2", 8, 8, 3, 3), w("c2b", 8)], ["b"], pads=[1, 1, 1, 1])
    )
    nodes.append(helper.make_node("Conv", ["a_p", w("sc", 8, 8, 1, 1)], ["s"]))
    nodes.append(helper.make_node("Add", ["b", "s"], ["r"]))
    nodes.append(helper.make_node("AveragePool", ["r"], ["q"], kernel_shape=[4, 4], strides=[4, 4]))
    nodes.append(helper.make_node("Flatten", ["q"], ["f"], axis=1))
    nodes.append(helper.make_node("Gemm", ["f", w("fc", 32, 8 * 7 * 7), w("fcb", 32)], ["g"], transB=1))
    bn("g", 32, "emb")
    graph = helper.make_graph(
        nodes,
        "iresnet_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 56, 56])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_equals_onnxruntime_and_passes_gradients(tmp_path):
    import onnxruntime as ort

    path = _iresnet_like(str(tmp_path / "rec.onnx"))
    x = np.random.default_rng(1).standard_normal((3, 3, 56, 56)).astype(np.float32)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = OnnxModule(path)
    inp = torch.from_numpy(x).requires_grad_(True)
    got = module(inp)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)
    got.pow(2).sum().backward()
    assert inp.grad is not None and float(inp.grad.abs().sum()) > 0
    assert all(not b.requires_grad for b in module.buffers())


def test_tiny_pack_recognizer_equals_onnxruntime(tiny_paths):
    import onnxruntime as ort

    path = str(tiny_paths["face_root"] / "models" / "antelopev2" / "glintr100.onnx")
    x = (np.random.default_rng(2).random((2, 3, 112, 112)) * 2 - 1).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(OnnxModule(path)(torch.from_numpy(x)).numpy(), want, rtol=1e-4, atol=1e-4)


def test_unsupported_operator_is_named(tmp_path):
    node = helper.make_node("Resize", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    with pytest.raises(ValueError, match="not supported by the torch recognizer: Resize"):
        OnnxModule(helper.make_model(graph))
