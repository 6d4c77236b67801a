"""Versatile-filter rewrites of a Conv node (Wang et al. 2018, NeurIPS).

Spatial (`apply_spatial_versatile`, factors from `factorize.versatile.spatial_versatile`):
secondary ``(p, i) = M_i ∘ f_p`` convolved with x equals the primary *cropped* to its centred
``k_i = d - 2i + 2`` square convolved with x, with the pads shrunk by ``(i-1)·δ`` on every side
(δ the dilation): the window of output position o starts ``(i-1)·δ`` further in and ends
``(i-1)·δ`` earlier, so the output grid is unchanged. One Conv per level computes all the
primaries used at that level (strides, dilations and groups kept), the level outputs are
concatenated on the channel axis and one Gather on axis 1 puts the channels in the original
order (left out when that order is already the identity). Where a shrunk pad would be negative
(e.g. a conv without padding), the input is Sliced by that amount instead (a negative pad
crops). The bias goes on the level convs: every used level-conv channel is exactly one
original output channel (unused padding channels get 0), so no Add is needed.

    x ─┬─ Conv(level 1, k=d)     ─┐
       ├─ Conv(level 2, k=d-2)   ─┼─ Concat(axis 1) ─ Gather(axis 1, original order) ─ y
       └─ ...                    ─┘

MACs per output pixel: ``Σ_i g·n_i·(S/g)·k_i²``. The paper's alternative, sharing ring sums
(ring convs of each primary computed once, the outer rings accumulated into the inner
outputs), costs the same MACs (a ring conv is a dense ``k_i x k_i`` conv with a zero centre)
plus the additions, so the cropped convs are used. Stored weights: the crops,
``Σ_i g·n_i·(S/g)·k_i²`` values (for d = 3 with full sets: 10/18 of the original).

Channel (`apply_channel_versatile`, factors from `channel_versatile`): x ``[B, S, H, W]`` is
reshaped to ``[B, 1, S, H, W]``; a 3-D Conv with weight ``[P, 1, ĉ, kh, kw]``, strides
``(g_c, sh, sw)``, dilations ``(1, dh, dw)`` and pads ``(0, ph0, pw0, 0, ph1, pw1)`` gives
``[B, P, n, H', W']``; a Reshape to ``[B, P·n, H', W']`` (target shape built from Shape, Gather
and Concat, so dynamic batch and spatial sizes keep working), a Gather of the used outputs in
the original order, and an Add of the bias ``[1, T, 1, 1]``.

Both builders keep the node's output tensor, name new tensors and nodes
``<node name>/versatile/...``, detach the original node (``graph.cleanup()`` removes it) and
return the new nodes. They refuse (ValueError with the reason) what they cannot express:
see `spatial_versatile_reason` and `channel_versatile_reason`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lowrank.factorize.versatile import (
    ChannelVersatileFactors,
    SpatialVersatileFactors,
)
from onnx_lowrank.graph import Layer

__all__ = [
    "apply_channel_versatile",
    "apply_spatial_versatile",
    "channel_versatile_reason",
    "spatial_versatile_reason",
    "versatile_costs",
]

_INT64_MAX = np.iinfo(np.int64).max


def _common_reason(layer: Layer, what: str) -> str | None:
    if layer.op != "Conv" or layer.conv is None or layer.weight is None:
        return f"{what} replace a Conv with a constant weight; '{layer.name}' is a {layer.op}"
    if layer.weight.ndim != 4:
        return f"{what} need a 2-D convolution; '{layer.name}' is {layer.weight.ndim - 2}-D"
    if layer.conv.pads is None:
        return (f"{what}: '{layer.name}' has auto_pad={layer.conv.auto_pad} with a stride above 1, "
                "so its pads depend on the input size; the shrunk pads of the rewrite cannot be written")
    return None


def spatial_versatile_reason(layer: Layer) -> str | None:
    """Why `apply_spatial_versatile` cannot rewrite `layer`, or None.

    Needs a 2-D Conv with a constant square kernel ``d x d``, ``d >= 2``, and explicit pads
    (`layer.conv.pads` not None); any strides, dilations, pads and groups.
    """
    what = "spatial versatile filters"
    reason = _common_reason(layer, what)
    if reason is not None:
        return reason
    kh, kw = layer.weight.shape[2:]
    if kh != kw:
        return f"{what} need a square kernel; '{layer.name}' has {kh} x {kw}"
    if kh < 2:
        return f"{what} need a kernel of size 2 or more; '{layer.name}' has {kh} x {kw}"
    return None


def channel_versatile_reason(layer: Layer) -> str | None:
    """Why `apply_channel_versatile` cannot rewrite `layer`, or None.

    Needs an ungrouped 2-D Conv with a constant weight and explicit pads (any kernel size,
    strides, dilations and pads).
    """
    what = "channel versatile filters"
    reason = _common_reason(layer, what)
    if reason is not None:
        return reason
    if layer.conv.group != 1:
        return (f"{what} need an ungrouped convolution (a primary's channel windows would cross "
                f"groups); '{layer.name}' has {layer.conv.group} groups")
    if layer.weight.shape[1] < 2:
        return f"{what} need at least 2 input channels to share; '{layer.name}' has 1"
    return None


def _check(layer: Layer, factors, kind: type, reason: str | None) -> None:
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(factors, kind):
        raise TypeError(f"'{layer.name}': expected {kind.__name__}, found {type(factors).__name__}")
    if tuple(factors.shape) != tuple(layer.weight.shape):
        raise ValueError(f"'{layer.name}': the factors are of a {list(factors.shape)} kernel, "
                         f"the layer's weight is {list(layer.weight.shape)}")
    if isinstance(factors, SpatialVersatileFactors) and factors.groups != layer.conv.group:
        raise ValueError(f"'{layer.name}': the factors were fitted with groups={factors.groups}, "
                         f"the layer has group={layer.conv.group}")


def _bias_values(node: gs.Node, layer: Layer) -> np.ndarray | None:
    if len(node.inputs) > 2 and layer.bias_name:
        bias = node.inputs[2]
        values = bias.values if isinstance(bias, gs.Constant) else layer.bias
        return np.asarray(values)
    return None


def _const(name: str, values) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(values))


def _var(name: str, like: gs.Tensor) -> gs.Variable:
    return gs.Variable(name, dtype=like.dtype)


def _slice(tag: str, x: gs.Tensor, starts: list[int], ends: list[int], axes: list[int], opset: int
           ) -> tuple[gs.Node, gs.Variable]:
    out = _var(f"{tag}_sliced", x)
    if opset < 10:
        node = gs.Node("Slice", f"{tag}_Slice", {"starts": starts, "ends": ends, "axes": axes}, [x], [out])
    else:
        inputs = [x, _const(f"{tag}_starts", np.array(starts, np.int64)),
                  _const(f"{tag}_ends", np.array(ends, np.int64)), _const(f"{tag}_axes", np.array(axes, np.int64))]
        node = gs.Node("Slice", f"{tag}_Slice", {}, inputs, [out])
    return node, out


def apply_spatial_versatile(graph: gs.Graph, node: gs.Node, layer: Layer,
                            factors: SpatialVersatileFactors) -> list[gs.Node]:
    """Replace the Conv `node` by one Conv per level, a Concat and a Gather (module docstring).

    Raises ValueError (with `spatial_versatile_reason`'s text) for layers it cannot rewrite, or
    when `factors` do not fit the layer's weight and groups.
    """
    _check(layer, factors, SpatialVersatileFactors, spatial_versatile_reason(layer))
    conv = layer.conv
    dtype = layer.weight.dtype
    prefix = f"{node.name}/versatile"
    x, output = node.inputs[0], node.outputs[0]
    bias = _bias_values(node, layer)
    channel = factors.output_channels()
    levels = [i for i in range(1, factors.n_levels + 1) if factors.level_table(i).size]
    total = sum(factors.level_table(i).size for i in levels)
    identity = total == len(channel) and np.array_equal(channel, np.arange(total))
    opset = graph.opset or 1
    built: list[gs.Node] = []
    outputs: list[gs.Tensor] = []
    slices: dict[tuple, gs.Tensor] = {}
    start = 0
    for level in levels:
        tag = f"{prefix}/level{level}"
        table = factors.level_table(level).ravel()
        shrink = [(level - 1) * dil for dil in conv.dilations]
        begin = [p - a for p, a in zip(conv.pads[:2], shrink, strict=True)]
        end = [p - a for p, a in zip(conv.pads[2:], shrink, strict=True)]
        source = x
        crop = tuple(max(0, -v) for v in begin + end)
        if any(crop):
            if crop not in slices:
                node_, slices[crop] = _slice(tag, x, list(crop[:2]),
                                             [-c if c else _INT64_MAX for c in crop[2:]], [2, 3], opset)
                built.append(node_)
            source = slices[crop]
        pads = [max(0, v) for v in begin + end]
        weight = _const(f"{tag}_weight", factors.level_kernel(level).astype(dtype))
        inputs = [source, weight]
        if bias is not None:
            level_bias = np.zeros(table.size, dtype=bias.dtype)
            used = (channel >= start) & (channel < start + table.size)
            level_bias[channel[used] - start] = bias[used]
            inputs.append(_const(f"{tag}_bias", level_bias))
        result = output if identity and len(levels) == 1 else _var(f"{tag}_out", output)
        size = factors.level_size(level)
        attrs = {"kernel_shape": [size, size], "strides": list(conv.strides),
                 "dilations": list(conv.dilations), "pads": pads, "group": conv.group}
        built.append(gs.Node("Conv", f"{tag}_Conv", attrs, inputs, [result]))
        outputs.append(result)
        start += table.size
    if len(outputs) > 1:
        joined = output if identity else _var(f"{prefix}/concat_out", output)
        built.append(gs.Node("Concat", f"{prefix}/Concat", {"axis": 1}, outputs, [joined]))
    else:
        joined = outputs[0]
    if not identity:
        indices = _const(f"{prefix}/order", channel.astype(np.int64))
        built.append(gs.Node("Gather", f"{prefix}/Gather", {"axis": 1}, [joined, indices], [output]))
    node.outputs.clear()
    graph.nodes.extend(built)
    return built


def apply_channel_versatile(graph: gs.Graph, node: gs.Node, layer: Layer,
                            factors: ChannelVersatileFactors) -> list[gs.Node]:
    """Replace the Conv `node` by Reshape, 3-D Conv, Reshape, Gather and Add (module docstring).

    Raises ValueError (with `channel_versatile_reason`'s text) for layers it cannot rewrite, for
    models of opset < 5 (Reshape takes its shape as an input from opset 5), or when `factors`
    do not fit the layer's weight.
    """
    _check(layer, factors, ChannelVersatileFactors, channel_versatile_reason(layer))
    if (graph.opset or 1) < 5:
        raise ValueError(f"channel versatile filters need opset 5 or later (Reshape with a shape "
                         f"input); the model of '{layer.name}' has opset {graph.opset}")
    conv = layer.conv
    dtype = layer.weight.dtype
    prefix = f"{node.name}/versatile"
    x, output = node.inputs[0], node.outputs[0]
    bias = _bias_values(node, layer)
    count, channels = factors.shape[:2]
    n_prim, n = factors.primaries.shape[0], factors.n_outputs
    selection = np.array(factors.selection, dtype=np.int64)
    identity = n_prim * n == count and np.array_equal(selection, np.arange(count))
    built: list[gs.Node] = []

    def shape_of(tensor: gs.Tensor, tag: str, front: int, back: list[int], middle: list[int]) -> gs.Variable:
        """Concat(dims[front], middle, dims[back]) of `tensor`'s runtime shape."""
        shape = gs.Variable(f"{tag}_shape", dtype=np.int64)
        head = gs.Variable(f"{tag}_batch", dtype=np.int64)
        tail = gs.Variable(f"{tag}_spatial", dtype=np.int64)
        target = gs.Variable(f"{tag}_target", dtype=np.int64)
        built.extend([
            gs.Node("Shape", f"{tag}_Shape", {}, [tensor], [shape]),
            gs.Node("Gather", f"{tag}_GatherBatch", {"axis": 0},
                    [shape, _const(f"{tag}_batch_index", np.array([front], np.int64))], [head]),
            gs.Node("Gather", f"{tag}_GatherSpatial", {"axis": 0},
                    [shape, _const(f"{tag}_spatial_index", np.array(back, np.int64))], [tail]),
            gs.Node("Concat", f"{tag}_Concat", {"axis": 0},
                    [head, _const(f"{tag}_middle", np.array(middle, np.int64)), tail], [target]),
        ])
        return target

    volume = _var(f"{prefix}/volume", x)
    built.append(gs.Node("Reshape", f"{prefix}/Reshape5d", {},
                         [x, shape_of(x, f"{prefix}/in", 0, [2, 3], [1, channels])], [volume]))
    stacked = _var(f"{prefix}/conv3d_out", x)
    kernel = list(factors.primaries.shape[2:])
    pads = conv.pads
    attrs = {"kernel_shape": kernel, "strides": [factors.stride, *conv.strides],
             "dilations": [1, *conv.dilations], "pads": [0, pads[0], pads[1], 0, pads[2], pads[3]], "group": 1}
    weight = _const(f"{prefix}/weight", factors.primaries.astype(dtype))
    built.append(gs.Node("Conv", f"{prefix}/Conv3d", attrs, [volume, weight], [stacked]))
    flat = output if identity and bias is None else _var(f"{prefix}/flat", output)
    built.append(gs.Node("Reshape", f"{prefix}/Reshape4d", {},
                         [stacked, shape_of(stacked, f"{prefix}/out", 0, [3, 4], [n_prim * n])], [flat]))
    current = flat
    if not identity:
        current = output if bias is None else _var(f"{prefix}/gathered", output)
        built.append(gs.Node("Gather", f"{prefix}/Gather", {"axis": 1},
                             [flat, _const(f"{prefix}/order", selection)], [current]))
    if bias is not None:
        built.append(gs.Node("Add", f"{prefix}/AddBias", {},
                             [current, _const(f"{prefix}/bias", bias.reshape(1, -1, 1, 1))], [output]))
    node.outputs.clear()
    graph.nodes.extend(built)
    return built


def versatile_costs(layer: Layer, factors: SpatialVersatileFactors | ChannelVersatileFactors
                    ) -> tuple[int, int]:
    """(MACs, parameters) of the rewritten nodes on the layer's shapes; the bias counts once.

    Each Conv costs ``prod(output) · prod(weight[1:])``; Concat, Gather, Reshape and the bias
    are free. Spatial: ``Σ_i B·(g·n_i)·H'·W' · (S/g)·k_i²``, parameters the cropped weights
    ``Σ_i g·n_i·(S/g)·k_i²`` (+ T bias). Channel: ``B·P·n·H'·W' · ĉ·kh·kw``, parameters
    ``P·ĉ·kh·kw`` (+ T bias).
    """
    if layer.output_shape is None:
        raise ValueError(f"'{layer.name}': the output shape is unknown; pin the input shapes to cost the rewrite")
    batch, _, *spatial = layer.output_shape
    pixels = batch * math.prod(spatial)
    bias = 0 if layer.bias is None else int(layer.bias.size)
    if isinstance(factors, SpatialVersatileFactors):
        weights = [factors.level_kernel(i).shape for i in range(1, factors.n_levels + 1)]
        params = sum(math.prod(shape) for shape in weights)
        macs = sum(pixels * shape[0] * math.prod(shape[1:]) for shape in weights)
        return macs, params + bias
    if isinstance(factors, ChannelVersatileFactors):
        shape = factors.primaries.shape
        macs = pixels * shape[0] * factors.n_outputs * math.prod(shape[1:])
        return macs, math.prod(shape) + bias
    raise TypeError(f"'{layer.name}': expected versatile factors, found {type(factors).__name__}")
