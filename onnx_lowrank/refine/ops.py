"""Forward and backward passes of the ONNX nodes a refined block may hold, in numpy.

Each op is a function ``forward(inputs, attrs) -> (outputs, saved)`` and a matching
``backward(saved, output_grads) -> input_grads`` (None, or a shorter list, for inputs with no
gradient: shapes, axes, bounds). The ops cover what sits between and around the chains of a low-rank rewrite in CNNs
and MLPs: 2-D convolutions (any groups, strides, pads, dilations; im2col and a batched matmul),
Gemm and MatMul, the element-wise arithmetic with numpy broadcasting, BatchNormalization in
inference form, the activations of `factorize.activation.Activation` (Relu, LeakyRelu, Clip,
HardSigmoid, HardSwish, Sigmoid), GlobalAveragePool, MaxPool and the shape ops (Shape, Reshape,
Flatten, Transpose, Identity, Squeeze/Unsqueeze with constant axes, Concat).
Every backward is checked against finite differences in tests/test_refine.py.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnx_lowrank.factorize.activation import Activation

__all__ = ["OPS", "unsupported"]


def unsupported(node_op: str, attrs: dict, inputs: list[np.ndarray | None]) -> str | None:
    """Why a node cannot be run here (one line), or None."""
    if node_op not in OPS:
        return f"{node_op} has no gradient here"
    if node_op in ("Conv", "MaxPool") and len(attrs.get("kernel_shape", [0, 0])) != 2:
        return f"only 2-D {node_op}"
    if node_op == "MaxPool" and (any(attrs.get("pads", [0])) or any(d != 1 for d in attrs.get("dilations", [1]))
                                 or attrs.get("ceil_mode", 0)):
        return "MaxPool with pads, dilations or ceil_mode"
    if node_op == "Conv" and attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "Conv with SAME auto_pad"
    return None


# ----------------------------------------------------------------------------- helpers


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` down to `shape` (the inverse of numpy broadcasting)."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


def _pair(attrs: dict, name: str, default: int) -> tuple[int, int]:
    value = attrs.get(name, [default, default])
    return int(value[0]), int(value[1])


# ----------------------------------------------------------------------------- convolution


def _im2col(x: np.ndarray, kernel, strides, dilations, pads, groups):
    """``[g, B·Ho·Wo, (C/g)·kh·kw]`` patches of ``x [B, C, H, W]`` and the output size."""
    batch, channels = x.shape[:2]
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [dilations[i] * (kernel[i] - 1) + 1 for i in range(2)]
    windows = sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    height, width = windows.shape[2:4]
    cols = windows.reshape(batch, groups, channels // groups, height, width, kernel[0] * kernel[1])
    cols = cols.transpose(1, 0, 3, 4, 2, 5).reshape(groups, batch * height * width, -1)
    return cols, height, width


def _col2im(cols, shape, kernel, strides, dilations, pads, groups, height, width):
    """The adjoint of `_im2col`: patch gradients summed back onto the input ``[B, C, H, W]``."""
    batch, channels, rows, columns = shape
    grad = cols.reshape(groups, batch, height, width, channels // groups, kernel[0], kernel[1])
    grad = grad.transpose(1, 0, 4, 5, 6, 2, 3).reshape(batch, channels, kernel[0], kernel[1], height, width)
    padded = np.zeros((batch, channels, rows + pads[0] + pads[2], columns + pads[1] + pads[3]), cols.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            top, left = i * dilations[0], j * dilations[1]
            padded[:, :, top:top + strides[0] * height:strides[0],
                   left:left + strides[1] * width:strides[1]] += grad[:, :, i, j]
    return padded[:, :, pads[0]:pads[0] + rows, pads[1]:pads[1] + columns]


def _conv_geometry(attrs: dict, weight: np.ndarray):
    kernel = weight.shape[2:]
    pads = tuple(int(p) for p in attrs.get("pads", [0, 0, 0, 0]))
    return kernel, _pair(attrs, "strides", 1), _pair(attrs, "dilations", 1), pads, int(attrs.get("group", 1))


def conv_forward(inputs, attrs):
    """``y[b, o] = Σ W[o] * x[b]`` per group as ``cols_g @ W_gᵀ`` (+ bias)."""
    x, weight, *rest = inputs
    kernel, strides, dilations, pads, groups = _conv_geometry(attrs, weight)
    cols, height, width = _im2col(x, kernel, strides, dilations, pads, groups)
    lowered = weight.reshape(groups, weight.shape[0] // groups, -1)
    out = np.matmul(cols, lowered.transpose(0, 2, 1))          # [g, B·Ho·Wo, O/g]
    batch = x.shape[0]
    y = out.reshape(groups, batch, height, width, -1).transpose(1, 0, 4, 2, 3).reshape(batch, -1, height, width)
    if rest and rest[0] is not None:
        y = y + rest[0].reshape(1, -1, 1, 1)
    return [y], (x.shape, cols, lowered, weight.shape, (kernel, strides, dilations, pads, groups, height, width),
                 bool(rest and rest[0] is not None))


def conv_backward(saved, grads):
    shape, cols, lowered, weight_shape, (kernel, strides, dilations, pads, groups, height, width), biased = saved
    dy = grads[0]
    batch = dy.shape[0]
    dout = dy.reshape(batch, groups, -1, height, width).transpose(1, 0, 3, 4, 2).reshape(groups, batch * height * width, -1)
    dweight = np.matmul(dout.transpose(0, 2, 1), cols).reshape(weight_shape)
    dcols = np.matmul(dout, lowered)
    dx = _col2im(dcols, shape, kernel, strides, dilations, pads, groups, height, width)
    return [dx, dweight] + ([dy.sum(axis=(0, 2, 3))] if biased else [])


# ----------------------------------------------------------------------------- products


def matmul_forward(inputs, attrs):
    a, b = inputs
    return [np.matmul(a, b)], (a, b)


def matmul_backward(saved, grads):
    a, b = saved
    dy = grads[0]
    da = np.matmul(dy, np.swapaxes(b, -1, -2)) if b.ndim > 1 else np.multiply.outer(dy, b)
    db = np.matmul(np.swapaxes(a, -1, -2), dy) if a.ndim > 1 else np.multiply.outer(a, dy)
    return [_unbroadcast(da, a.shape), _unbroadcast(db, b.shape)]


def gemm_forward(inputs, attrs):
    """``alpha · op(A) op(B) + beta · C``."""
    a, b, *rest = inputs
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    opa, opb = (a.T if ta else a), (b.T if tb else b)
    y = alpha * opa @ opb
    c = rest[0] if rest and rest[0] is not None else None
    if c is not None:
        y = y + beta * c
    return [y], (opa, opb, alpha, beta, ta, tb, None if c is None else c.shape)


def gemm_backward(saved, grads):
    opa, opb, alpha, beta, ta, tb, c_shape = saved
    dy = grads[0]
    dopa, dopb = alpha * dy @ opb.T, alpha * opa.T @ dy
    result = [dopa.T if ta else dopa, dopb.T if tb else dopb]
    if c_shape is not None:
        result.append(_unbroadcast(beta * dy, c_shape))
    return result


# ----------------------------------------------------------------------------- element-wise


def _binary(op):
    def forward(inputs, attrs):
        a, b = inputs
        return [op(a, b)], (a, b)
    return forward


def add_backward(saved, grads):
    a, b = saved
    return [_unbroadcast(grads[0], a.shape), _unbroadcast(grads[0], b.shape)]


def sub_backward(saved, grads):
    a, b = saved
    return [_unbroadcast(grads[0], a.shape), _unbroadcast(-grads[0], b.shape)]


def mul_backward(saved, grads):
    a, b = saved
    return [_unbroadcast(grads[0] * b, a.shape), _unbroadcast(grads[0] * a, b.shape)]


def div_backward(saved, grads):
    a, b = saved
    return [_unbroadcast(grads[0] / b, a.shape), _unbroadcast(-grads[0] * a / (b * b), b.shape)]


def _activation(node_op: str, attrs: dict, inputs) -> Activation:
    """The element-wise op as an `Activation` with a unit affine map (scalars broadcast)."""
    one, zero = np.ones(1), np.zeros(1)
    if node_op == "Relu":
        return Activation("relu", one, zero)
    if node_op == "LeakyRelu":
        return Activation("leaky_relu", one, zero, (float(attrs.get("alpha", 0.01)),))
    if node_op == "HardSigmoid":
        return Activation("hard_sigmoid", one, zero, (float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))))
    if node_op == "HardSwish":
        return Activation("hard_swish", one, zero, (1 / 6, 0.5))
    if node_op == "Sigmoid":
        return Activation("sigmoid", one, zero)
    low = float(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else float(attrs.get("min", -np.inf))
    high = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else float(attrs.get("max", np.inf))
    return Activation("clip", one, zero, (low, high))


def _elementwise(node_op: str):
    def forward(inputs, attrs):
        function = _activation(node_op, attrs, inputs)
        x = inputs[0]
        return [function(x).astype(x.dtype)], (function, x, len(inputs))

    return forward


def elementwise_backward(saved, grads):
    function, x, count = saved
    return [grads[0] * function.derivative(x).astype(x.dtype)] + [None] * (count - 1)


def batchnorm_forward(inputs, attrs):
    x, gamma, beta, mean, var = inputs
    scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return [x * scale.reshape(shape) + (beta - scale * mean).reshape(shape)], (scale.reshape(shape),)


def batchnorm_backward(saved, grads):
    return [grads[0] * saved[0], None, None, None, None]


def global_average_forward(inputs, attrs):
    x = inputs[0]
    axes = tuple(range(2, x.ndim))
    return [x.mean(axis=axes, keepdims=True)], (x.shape,)


def global_average_backward(saved, grads):
    shape = saved[0]
    return [np.broadcast_to(grads[0], shape) / math.prod(shape[2:])]


def maxpool_forward(inputs, attrs):
    x = inputs[0]
    kernel, strides = _pair(attrs, "kernel_shape", 1), _pair(attrs, "strides", 1)
    windows = sliding_window_view(x, kernel, axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    flat = windows.reshape(*windows.shape[:4], -1)
    index = flat.argmax(axis=-1)
    return [np.take_along_axis(flat, index[..., None], axis=-1)[..., 0]], (x.shape, index, kernel, strides)


def maxpool_backward(saved, grads):
    shape, index, kernel, strides = saved
    dx = np.zeros(shape, grads[0].dtype)
    rows, cols = np.divmod(index, kernel[1])
    b, c, h, w = np.indices(index.shape)
    np.add.at(dx, (b, c, h * strides[0] + rows, w * strides[1] + cols), grads[0])
    return [dx]


# ----------------------------------------------------------------------------- shapes


def shape_forward(inputs, attrs):
    return [np.array(inputs[0].shape, dtype=np.int64)], None


def no_gradient(saved, grads):
    return [None]


def reshape_forward(inputs, attrs):
    x, shape = inputs
    target = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(shape)]
    return [x.reshape(target)], (x.shape,)


def flatten_forward(inputs, attrs):
    x = inputs[0]
    axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
    return [x.reshape(math.prod(x.shape[:axis]), -1)], (x.shape,)


def squeeze_forward(inputs, attrs):
    x = inputs[0]
    axes = inputs[1] if len(inputs) > 1 else attrs.get("axes")
    return [np.squeeze(x, tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)], (x.shape,)


def unsqueeze_forward(inputs, attrs):
    x = inputs[0]
    axes = inputs[1] if len(inputs) > 1 else attrs.get("axes")
    return [np.expand_dims(x, tuple(int(a) for a in axes))], (x.shape,)


def reshaped_backward(saved, grads):
    """Reshape, Flatten, Squeeze, Unsqueeze and Identity: the gradient takes the input's shape."""
    return [grads[0].reshape(saved[0])]


def transpose_forward(inputs, attrs):
    x = inputs[0]
    perm = attrs.get("perm", list(range(x.ndim))[::-1])
    return [np.transpose(x, perm)], (np.argsort(perm),)


def transpose_backward(saved, grads):
    return [np.transpose(grads[0], saved[0])]


def identity_forward(inputs, attrs):
    return [inputs[0]], (inputs[0].shape,)


def concat_forward(inputs, attrs):
    axis = int(attrs["axis"])
    return [np.concatenate(inputs, axis=axis)], (axis, [x.shape[axis] for x in inputs])


def concat_backward(saved, grads):
    axis, sizes = saved
    return list(np.split(grads[0], np.cumsum(sizes)[:-1], axis=axis))


OPS = {
    "Conv": (conv_forward, conv_backward),
    "MatMul": (matmul_forward, matmul_backward),
    "Gemm": (gemm_forward, gemm_backward),
    "Add": (_binary(np.add), add_backward),
    "Sub": (_binary(np.subtract), sub_backward),
    "Mul": (_binary(np.multiply), mul_backward),
    "Div": (_binary(np.divide), div_backward),
    **{op: (_elementwise(op), elementwise_backward)
       for op in ("Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid")},
    "BatchNormalization": (batchnorm_forward, batchnorm_backward),
    "GlobalAveragePool": (global_average_forward, global_average_backward),
    "MaxPool": (maxpool_forward, maxpool_backward),
    "Shape": (shape_forward, no_gradient),
    "Reshape": (reshape_forward, reshaped_backward),
    "Flatten": (flatten_forward, reshaped_backward),
    "Squeeze": (squeeze_forward, reshaped_backward),
    "Unsqueeze": (unsqueeze_forward, reshaped_backward),
    "Identity": (identity_forward, reshaped_backward),
    "Transpose": (transpose_forward, transpose_backward),
    "Concat": (concat_forward, concat_backward),
}
