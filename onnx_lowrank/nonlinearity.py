"""Which element-wise activation each layer's output goes through, read from the graph.

For activation-aware fitting (`onnx_lowrank.activation_fit`) a layer qualifies when its output
tensor is read by a single node path of per-channel affine nodes (BatchNormalization in
inference form; Mul / Add / Sub / Div with a constant that varies along the channel axis only)
ending in an element-wise nonlinearity: Relu, LeakyRelu, PRelu (constant slope per channel),
Clip (constant bounds), HardSigmoid, Sigmoid, HardSwish, or a gated unit spelled as two readers
of one tensor, ``Mul(u, HardSigmoid(u))`` (hard-swish below opset 14) or ``Mul(u, Sigmoid(u))``
(swish). The result is a `factorize.activation.Activation` per qualifying layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank.factorize.activation import Activation
from onnx_lowrank.graph import Layer

__all__ = ["activations_after"]

_GATES = {"HardSigmoid": "hard_swish", "Sigmoid": "swish"}


def activations_after(model: onnx.ModelProto, layers: Sequence[Layer]) -> dict[str, Activation]:
    """Layer name -> the `Activation` its output goes through, for the main-graph layers that have one."""
    graph = _Graph(model)
    found = {}
    for layer in layers:
        if (layer.subgraph is None and layer.weight is not None and layer.op in ("Conv", "Gemm", "MatMul")
                and layer.weight_side == "right"):
            channels = layer.weight.shape[0] if layer.op == "Conv" else layer.matrix().shape[1]
            # the channel axis, counted from the last: a conv's output is [N, C, d1..dn]
            from_end = layer.weight.ndim - 2 if layer.op == "Conv" else 0
            activation = graph.activation(layer.outputs[0], channels, from_end)
            if activation is not None:
                found[layer.name] = activation
    return found


class _Graph:
    """Readers and constants of the main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in set(node.input):
                self.readers[name].append(node)
        self.outputs = {o.name for o in model.graph.output}

    def activation(self, tensor: str, channels: int, from_end: int) -> Activation | None:
        """Follow `tensor` through per-channel affine nodes to an activation, composing the affine map."""
        scale, shift = np.ones(channels), np.zeros(channels)
        while tensor not in self.outputs:
            readers = self.readers.get(tensor, [])
            if len(readers) == 2:
                return self._gated(tensor, readers, scale, shift)
            if len(readers) != 1:
                return None
            node = readers[0]
            affine = self._affine(node, tensor, channels, from_end)
            if affine is not None:
                s, t = affine
                scale, shift = s * scale, s * shift + t
                tensor = node.output[0]
                continue
            return self._single(node, scale, shift, channels)
        return None

    def _gated(self, tensor: str, readers: list[onnx.NodeProto], scale, shift) -> Activation | None:
        """``Mul(u, G(u))`` with G a HardSigmoid or Sigmoid reading the same `tensor`."""
        by_op = {node.op_type: node for node in readers}
        gate = next((by_op[op] for op in _GATES if op in by_op), None)
        mul = by_op.get("Mul")
        if gate is None or mul is None or sorted(mul.input) != sorted([tensor, gate.output[0]]):
            return None
        params = _hard_sigmoid_params(gate) if gate.op_type == "HardSigmoid" else ()
        return Activation(_GATES[gate.op_type], scale, shift, params)

    def _single(self, node: onnx.NodeProto, scale, shift, channels: int) -> Activation | None:
        op = node.op_type
        if op in ("Relu", "Sigmoid"):
            return Activation(op.lower(), scale, shift)
        if op == "LeakyRelu":
            return Activation("leaky_relu", scale, shift, (_attr(node, "alpha", 0.01),))
        if op == "HardSigmoid":
            return Activation("hard_sigmoid", scale, shift, _hard_sigmoid_params(node))
        if op == "HardSwish":
            return Activation("hard_swish", scale, shift, (1 / 6, 0.5))
        if op == "PRelu":
            slope = self.constants.get(node.input[1])
            if slope is None or slope.size not in (1, channels) or slope.size != max(slope.shape, default=1):
                return None
            return Activation("prelu", scale, shift, slope=np.broadcast_to(slope.reshape(-1), (channels,)).astype(float))
        if op == "Clip":
            bounds = self._clip_bounds(node)
            return None if bounds is None else Activation("clip", scale, shift, bounds)
        return None

    def _clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        """Clip's (min, max) from attributes (opset < 11) or constant inputs; None if an input is not constant."""
        low, high = _attr(node, "min", -np.inf), _attr(node, "max", np.inf)
        for index, default in ((1, low), (2, high)):
            if len(node.input) > index and node.input[index]:
                value = self.constants.get(node.input[index])
                if value is None or value.size != 1:
                    return None
                if index == 1:
                    low = float(value.reshape(()))
                else:
                    high = float(value.reshape(()))
        return low, high

    def _affine(self, node: onnx.NodeProto, tensor: str, channels: int, from_end: int):
        """(s, t) of a per-channel affine `node` reading `tensor`, or None."""
        op = node.op_type
        if op == "BatchNormalization" and node.input[0] == tensor and len(node.output) == 1:
            values = [self.constants.get(name) for name in node.input[1:5]]
            if any(v is None or v.size != channels for v in values):
                return None
            gamma, beta, mean, var = (v.reshape(-1).astype(np.float64) for v in values)
            s = gamma / np.sqrt(var + _attr(node, "epsilon", 1e-5))
            return s, beta - s * mean
        if op not in ("Mul", "Add", "Sub", "Div") or list(node.input).count(tensor) != 1:
            return None
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        value = self.constants.get(other)
        per_channel = None if value is None else _per_channel(value, channels, from_end)
        if per_channel is None:
            return None
        ones, zeros = np.ones(channels), np.zeros(channels)
        if op == "Mul":
            return per_channel, zeros
        if op == "Add":
            return ones, per_channel
        if op == "Sub":
            return (ones, -per_channel) if node.input[0] == tensor else (-ones, per_channel)
        if node.input[0] != tensor or np.any(per_channel == 0):
            return None                           # c / y is not affine in y
        return 1 / per_channel, zeros


def _per_channel(value: np.ndarray, channels: int, from_end: int) -> np.ndarray | None:
    """`value` as one number per channel when it broadcasts along the channel axis only (the
    axis `from_end` places before the last of the output; numpy broadcasting aligns the ends)."""
    if value.size == 1:
        return np.full(channels, float(value.reshape(())))
    position = value.ndim - 1 - from_end
    if value.size != channels or not 0 <= position < value.ndim or value.shape[position] != channels:
        return None
    return value.reshape(-1).astype(np.float64)


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attribute in node.attribute:
        if attribute.name == name:
            return float(onnx.helper.get_attribute_value(attribute))
    return default


def _hard_sigmoid_params(node: onnx.NodeProto) -> tuple[float, float]:
    return _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
