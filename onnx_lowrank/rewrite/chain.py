"""Chains of small nodes that replace one layer, built from three shared stage kinds.

A chain is a list of stages applied in order to the layer's data input; the last stage writes
the layer's original output tensor and takes its bias, so the rest of the graph is untouched.

- `ConvStage`: a Conv whose geometry follows its *role*: "full" takes the original kernel's
  strides, dilations and pads; "point" is a 1x..x1 conv with stride 1 and no padding; "axis"
  takes the stride, dilation and padding of one spatial dimension only (its kernel is 1
  elsewhere, so SAME padding there is zero and `auto_pad` carries over unchanged).
- `ShuffleStage`: the channel shuffle between the two stages of a tiled SVD,
  `[B, b·a·r, ...] -> [B, b, a, r, -1] -> transpose(0, 2, 1, 3, 4) -> [B, a·b·r, ...]`.
- `MatMulStage`: a product with a constant matrix, on either side (Gemm layers become a Gemm
  pair, MatMul layers a MatMul pair).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lowrank.graph import Layer

__all__ = ["Chain", "ConvStage", "VersatileChain", "MatMulStage", "ShuffleStage", "apply_chain", "chain_costs",
           "flush_subnormals", "zero_subnormals"]


@dataclasses.dataclass(frozen=True)
class ConvStage:
    """One Conv with weight `[out, in/group, k..]`; `role` is "full", "point" or "axis".

    `transpose` makes it a ConvTranspose (weight `[in, out/group, k..]`, role "full"), which
    also takes the layer's output_padding and output_shape.
    """

    weight: np.ndarray
    group: int = 1
    role: str = "point"
    axis: int | None = None
    transpose: bool = False

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.group if self.transpose else self.weight.shape[0]


@dataclasses.dataclass(frozen=True)
class ShuffleStage:
    """Reorders channels from `(b, a, r)` to `(a, b, r)` major-to-minor."""

    outer: int
    inner: int
    per: int


@dataclasses.dataclass(frozen=True)
class MatMulStage:
    """`x @ weight` (side "right") or `weight @ x` (side "left")."""

    weight: np.ndarray
    side: str = "right"


Stage = ConvStage | ShuffleStage | MatMulStage


@dataclasses.dataclass(frozen=True)
class Chain:
    """The stages that replace `layer`, with the method and ranks recorded in each node's doc_string.

    `bias`, when set, is a new bias for the last node (Conv bias, or Gemm C) replacing the
    layer's own: data-aware fits shift it to correct the mean output.
    """

    method: str
    ranks: tuple[int, ...]
    stages: tuple[Stage, ...]
    bias: np.ndarray | None = None

    def describe(self, layer: Layer) -> str:
        """The provenance written into each new node's doc_string."""
        return f"onnx-lowrank: {self.method} ranks {list(self.ranks)} replacing {layer.op} '{layer.name}'"

    @property
    def params(self) -> int:
        return sum(s.weight.size for s in self.stages if not isinstance(s, ShuffleStage))


def zero_subnormals(array: np.ndarray) -> np.ndarray:
    """`array` with its subnormal values (0 < |w| < the dtype's smallest normal number) set to 0.

    They change no output measurably (below 1.2e-38 in float32) but make every multiply-add that
    meets them take a microcode assist on x86 CPUs: a refit factor of a PP-OCRv4 recogniser layer
    holding 476 of them (the rows of dead output channels) ran 14x slower in onnxruntime than the
    same factor flushed.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return array
    smallest = np.finfo(array.dtype).tiny
    subnormal = (array != 0) & (np.abs(array) < smallest)
    return np.where(subnormal, np.zeros((), array.dtype), array) if subnormal.any() else array


def flush_subnormals(chain: Chain) -> Chain:
    """`chain` with `zero_subnormals` applied to every stage's weight and to its bias."""
    stages = tuple(stage if isinstance(stage, ShuffleStage) else
                   dataclasses.replace(stage, weight=zero_subnormals(stage.weight)) for stage in chain.stages)
    bias = None if chain.bias is None else zero_subnormals(chain.bias)
    return dataclasses.replace(chain, stages=stages, bias=bias)


def _conv_geometry(stage: ConvStage, layer: Layer) -> dict:
    conv = layer.conv
    n = conv.spatial_dims
    kernel = list(stage.weight.shape[2:])
    attrs = {"kernel_shape": kernel, "group": stage.group}
    if stage.role == "point":
        return attrs
    if stage.role == "full":
        strides, dilations, pads = list(conv.strides), list(conv.dilations), conv.pads
    else:
        d = stage.axis
        strides = [conv.strides[d] if i == d else 1 for i in range(n)]
        dilations = [conv.dilations[d] if i == d else 1 for i in range(n)]
        pads = None if conv.pads is None else [
            conv.pads[i] if i % n == d else 0 for i in range(2 * n)]
    attrs.update(strides=strides, dilations=dilations)
    if pads is None:
        attrs["auto_pad"] = conv.auto_pad
    else:
        attrs["pads"] = list(pads)
    if stage.transpose:
        if conv.output_padding is not None:
            attrs["output_padding"] = list(conv.output_padding)
        if conv.output_shape is not None:
            attrs["output_shape"] = list(conv.output_shape)
    return attrs


def _stage_output_shape(stage: Stage, layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(stage, ShuffleStage):
        return shape
    if isinstance(stage, MatMulStage):
        if stage.side == "right":
            return (*shape[:-1], stage.weight.shape[1])
        return (*shape[:-2], stage.weight.shape[0], shape[-1])
    attrs = _conv_geometry(stage, layer)
    n = len(attrs["kernel_shape"])
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    if stage.transpose:
        return (shape[0], stage.out_channels, *layer.output_shape[2:])
    if "auto_pad" in attrs:
        spatial = [-(-shape[2 + d] // strides[d]) for d in range(n)]
    else:
        pads = attrs.get("pads", [0] * (2 * n))
        spatial = [(shape[2 + d] + pads[d] + pads[n + d]
                    - dilations[d] * (attrs["kernel_shape"][d] - 1) - 1) // strides[d] + 1
                   for d in range(n)]
    return (shape[0], stage.out_channels, *spatial)


def chain_costs(chain: Chain, layer: Layer) -> tuple[int, int]:
    """(MACs, parameters) of the chain on the layer's input shape; the bias counts once.

    Conv stage: `prod(output) · prod(weight[1:])`; product stage: `prod(output) · K`.
    """
    if isinstance(chain, VersatileChain):
        from onnx_lowrank.rewrite.versatile import versatile_costs

        return versatile_costs(layer, chain.factors)
    shape = layer.input_shape
    if layer.gemm is not None and layer.gemm.trans_a:
        shape = shape[::-1]
    macs = 0
    for stage in chain.stages:
        out = _stage_output_shape(stage, layer, shape)
        if isinstance(stage, ConvStage):
            macs += math.prod(shape if stage.transpose else out) * math.prod(stage.weight.shape[1:])
        elif isinstance(stage, MatMulStage):
            inner = stage.weight.shape[0] if stage.side == "right" else stage.weight.shape[1]
            macs += math.prod(out) * inner
        shape = out
    bias = chain.bias.size if chain.bias is not None else layer.params - layer.weight.size
    return macs, chain.params + bias


@dataclasses.dataclass(frozen=True)
class VersatileChain:
    """Versatile filters (Wang et al.) in place of a Conv: not a linear chain of stages but
    parallel convolutions of cropped primaries, built by `rewrite.versatile`."""

    method: str
    ranks: tuple[int, ...]
    factors: object
    bias: np.ndarray | None = None

    def describe(self, layer: Layer) -> str:
        return f"onnx-lowrank: {self.method} with {list(self.ranks)} primaries replacing {layer.op} '{layer.name}'"

    @property
    def params(self) -> int:
        return self.factors.n_params


def apply_chain(graph: gs.Graph, node: gs.Node, layer: Layer, chain: Chain | VersatileChain,
                replace: bool = True) -> list[gs.Node]:
    """Replace `node` in `graph` by the chain's nodes and return them.

    New tensor and node names are `<node name>/lowrank/<index>_<kind>`; the last node keeps
    the original output tensor. The original node is detached; `graph.cleanup()` removes it.
    With `replace=False` the chain runs beside the node instead, from the same input, into a new
    tensor `<node name>/lowrank/probe` (to measure the chain's own error).
    """
    if isinstance(chain, VersatileChain):
        return _apply_versatile(graph, node, layer, chain, replace)
    data_index = 1 if layer.op == "MatMul" and layer.weight_side == "left" else 0
    current = node.inputs[data_index]
    output = node.outputs[0] if replace else gs.Variable(f"{node.name}/lowrank/probe",
                                                         dtype=node.outputs[0].dtype)
    prefix = f"{node.name}/lowrank"
    if chain.bias is not None:
        bias = gs.Constant(f"{prefix}/bias", np.ascontiguousarray(chain.bias, dtype=layer.weight.dtype))
    else:
        bias = node.inputs[2] if len(node.inputs) > 2 and layer.bias_name else None
    dtype = layer.weight.dtype
    built = []
    for index, stage in enumerate(chain.stages):
        last = index == len(chain.stages) - 1
        tag = f"{prefix}/{index}"
        result = output if last else gs.Variable(f"{tag}_out", dtype=output.dtype)
        if isinstance(stage, ShuffleStage):
            built.extend(_shuffle_nodes(tag, current, result, stage))
        elif isinstance(stage, ConvStage):
            weight = gs.Constant(f"{tag}_weight", np.ascontiguousarray(stage.weight, dtype=dtype))
            inputs = [current, weight] + ([bias] if last and bias is not None else [])
            op = "ConvTranspose" if stage.transpose else "Conv"
            built.append(gs.Node(op, f"{tag}_{op}", _conv_geometry(stage, layer), inputs, [result]))
        else:
            built.append(_product_node(tag, current, result, stage, layer, last, bias, dtype))
        current = result
    if replace:
        node.outputs.clear()
    graph.nodes.extend(built)
    return built


def _apply_versatile(graph: gs.Graph, node: gs.Node, layer: Layer, chain: VersatileChain,
                     replace: bool) -> list[gs.Node]:
    from onnx_lowrank.rewrite import versatile

    target = node
    if not replace:  # a twin of the node writing a probe tensor, for the chain's own error
        probe = gs.Variable(f"{node.name}/versatile/probe", dtype=node.outputs[0].dtype)
        target = gs.Node("Conv", node.name, dict(node.attrs), list(node.inputs), [probe])
        graph.nodes.append(target)
    build = versatile.apply_spatial_versatile if chain.method == "versatile" else versatile.apply_channel_versatile
    built = build(graph, target, layer, chain.factors)
    if not replace:
        target.outputs.clear()
    return built


def _product_node(tag, current, result, stage: MatMulStage, layer: Layer, last: bool, bias, dtype):
    weight = gs.Constant(f"{tag}_weight", np.ascontiguousarray(stage.weight, dtype=dtype))
    if layer.op == "MatMul":
        inputs = [current, weight] if stage.side == "right" else [weight, current]
        return gs.Node("MatMul", f"{tag}_MatMul", {}, inputs, [result])
    gemm = layer.gemm
    if not last:
        return gs.Node("Gemm", f"{tag}_Gemm", {"transA": int(gemm.trans_a)}, [current, weight], [result])
    inputs = [current, weight] + ([bias] if bias is not None else [])
    return gs.Node("Gemm", f"{tag}_Gemm", {"alpha": gemm.alpha, "beta": gemm.beta}, inputs, [result])


def _shuffle_nodes(tag, current, result, stage: ShuffleStage) -> list[gs.Node]:
    split = gs.Constant(f"{tag}_split_shape",
                        np.array([0, stage.outer, stage.inner, stage.per, -1], dtype=np.int64))
    original_shape = gs.Variable(f"{tag}_shape", dtype=np.int64)
    grouped = gs.Variable(f"{tag}_grouped", dtype=current.dtype)
    swapped = gs.Variable(f"{tag}_swapped", dtype=current.dtype)
    return [
        gs.Node("Shape", f"{tag}_Shape", {}, [current], [original_shape]),
        gs.Node("Reshape", f"{tag}_Reshape", {}, [current, split], [grouped]),
        gs.Node("Transpose", f"{tag}_Transpose", {"perm": [0, 2, 1, 3, 4]}, [grouped], [swapped]),
        gs.Node("Reshape", f"{tag}_Unshape", {}, [swapped, original_shape], [result]),
    ]
