"""A face-recognition ONNX graph run as a differentiable torch module (for the training identity loss).

The recognizers InstantID uses (antelopev2's ``glintr100.onnx``, an IResNet; the tiny packs' stand-ins) are plain
feed-forward graphs of a dozen operator types. Interpreting the graph with torch functions keeps the weights as
frozen buffers and lets the gradient reach the *input* image, with no extra dependency (onnx2torch would pull
torchvision, which does not import beside a CPU torch). An operator outside :data:`OPS` is refused by name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs, dims: int):
    pads = list(attrs.get("pads", [0] * 2 * dims))
    begin, end = pads[:dims], pads[dims:]
    return begin, end


def _conv(x, w, b=None, **a):
    dims = w.dim() - 2
    begin, end = _pads(a, dims)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("Conv with auto_pad is not supported; export with explicit pads")
    if begin != end:  # asymmetric padding: pad explicitly (F.pad takes the last dimension first)
        x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
        begin = [0] * dims
    conv = F.conv2d if dims == 2 else F.conv1d
    return conv(
        x,
        w,
        b,
        stride=a.get("strides", 1),
        padding=begin,
        dilation=a.get("dilations", 1),
        groups=a.get("group", 1),
    )


def _batchnorm(x, scale, bias, mean, var, **a):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _gemm(a_, b_, c=None, **a):
    if a.get("transA", 0):
        a_ = a_.t()
    if a.get("transB", 0):
        b_ = b_.t()
    out = a.get("alpha", 1.0) * (a_ @ b_)
    return out if c is None else out + a.get("beta", 1.0) * c


def _prelu(x, slope, **a):
    if slope.dim() == 3 and x.dim() == 4:  # [C, 1, 1]: channel-wise, as IResNet exports it
        return torch.where(x >= 0, x, x * slope.unsqueeze(0))
    return torch.where(x >= 0, x, x * slope)


def _flatten(x, **a):
    axis = a.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])) if axis else 1, -1)


def _reshape(x, shape, **a):
    shape = [int(s) for s in shape.tolist()]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _pool(kind):
    def pool(x, **a):
        k = a["kernel_shape"]
        begin, end = _pads(a, len(k))
        if begin != end:
            x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
            begin = [0] * len(k)
        stride = a.get("strides", k)
        if kind == "max":
            return F.max_pool2d(x, k, stride, begin)
        return F.avg_pool2d(x, k, stride, begin, count_include_pad=bool(a.get("count_include_pad", 0)))

    return pool


OPS = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Relu": lambda x, **a: F.relu(x),
    "PRelu": _prelu,
    "LeakyRelu": lambda x, **a: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda x, **a: torch.sigmoid(x),
    "Tanh": lambda x, **a: torch.tanh(x),
    "Add": lambda x, y, **a: x + y,
    "Sub": lambda x, y, **a: x - y,
    "Mul": lambda x, y, **a: x * y,
    "Div": lambda x, y, **a: x / y,
    "MatMul": lambda x, y, **a: x @ y,
    "Gemm": _gemm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda x, **a: (
        x.permute(*a["perm"]) if "perm" in a else x.permute(*reversed(range(x.dim())))
    ),
    "Concat": lambda *xs, **a: torch.cat(xs, dim=a["axis"]),
    "GlobalAveragePool": lambda x, **a: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "AveragePool": _pool("avg"),
    "MaxPool": _pool("max"),
    "Identity": lambda x, **a: x,
    "Dropout": lambda x, *rest, **a: x,
}


class OnnxModule(nn.Module):
    """``OnnxModule(path or ModelProto)(x)``: the graph's first output for input ``x``; weights frozen buffers."""

    def __init__(self, model):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        graph = model.graph
        unsupported = sorted(
            {n.op_type for n in graph.node if n.op_type not in OPS and n.op_type != "Constant"}
        )
        if unsupported:
            raise ValueError(
                f"ONNX operators not supported by the torch recognizer: {', '.join(unsupported)}"
            )
        self._names: dict[str, str] = {}
        for k, init in enumerate(graph.initializer):
            self._add_const(f"w{k}", init.name, numpy_helper.to_array(init))
        self._nodes = []
        for node in graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                self._add_const(f"c{len(self._names)}", node.output[0], numpy_helper.to_array(attrs["value"]))
                continue
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        known = set(self._names)
        self.input_name = next(i.name for i in graph.input if i.name not in known)
        self.output_name = graph.output[0].name
        self.requires_grad_(False)

    def _add_const(self, attr: str, name: str, array: np.ndarray) -> None:
        self.register_buffer(attr, torch.from_numpy(np.array(array)), persistent=False)
        self._names[name] = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for op, inputs, outputs, attrs in self._nodes:
            args = [env[i] if i in env else getattr(self, self._names[i]) if i else None for i in inputs]
            while args and args[-1] is None:  # optional trailing inputs left empty
                args.pop()
            env[outputs[0]] = OPS[op](*args, **attrs)
        return env[self.output_name]
