"""Canonicalize a model and find its layers.

A *layer* is a Conv (1-D/2-D/3-D, any group count), ConvTranspose, Gemm or MatMul node. Each
layer is either a candidate for factorization or skipped with a reason a user understands.
Canonicalization makes the graph easy to read and rewrite without changing what it computes:
weights held by Constant nodes become initializers, `auto_pad` becomes explicit pads where that
is valid for every input size, initializers stop being graph inputs, and every node has a name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank.costs import node_macs
from onnx_lowrank.errors import InputError
from onnx_lowrank.weights import cached_weight

__all__ = [
    "ConvAttrs", "GemmAttrs", "Layer", "activations_before_outputs", "canonicalize", "find_layers",
    "iter_graphs", "model_totals", "onnx_opset", "with_outputs",
]

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm")
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
Shapes = Mapping[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class ConvAttrs:
    """A Conv node's attributes with ONNX defaults filled in.

    `pads` is `(b1..bN, e1..eN)`; when `auto_pad` is SAME_UPPER/SAME_LOWER and could not be made
    explicit for every input size, `pads` is None and the rewrite carries `auto_pad` instead.
    """

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None
    auto_pad: str
    group: int
    output_padding: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class GemmAttrs:
    """`Y = alpha · op(A) · op(B) + beta · C`, op transposing when the flag is set."""

    trans_a: bool
    trans_b: bool
    alpha: float
    beta: float
    has_c: bool


#: `Layer.weight` when none was given: the model's initializer `Layer.weight_tensor`, if any.
_FROM_MODEL = object()


@dataclasses.dataclass
class Layer:
    """One Conv/ConvTranspose/Gemm/MatMul node as the rest of the tool sees it.

    `weight` is the constant operand as stored (Conv `[T, S/g, k..]`; Gemm B as stored; MatMul
    the constant side). `matrix()` gives Gemm/MatMul weights as the `[K, N]` (or, constant on the
    left, `[M, K]`) matrix that is factorized. `subgraph` names the control-flow body holding
    the node ("node/attribute"), None in the main graph; `runs` is how often the model totals
    count it per model run (0 in an If branch they do not count, a Loop's trip count) and
    `scope` says so in words (`counting.annotate`). A layer found in a model reads `weight` from
    the model's initializer `weight_tensor` on each use (`weights.cached_weight`: read-only, no
    copy held per layer); a weight given directly is held as given.
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    subgraph: str | None = None
    weight_name: str | None = None
    weight: np.ndarray | None = _FROM_MODEL
    bias_name: str | None = None
    bias: np.ndarray | None = None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    conv: ConvAttrs | None = None
    gemm: GemmAttrs | None = None
    weight_side: str = "right"
    shared_with: tuple[str, ...] = ()
    skip_reason: str | None = None
    macs: int | None = None
    params: int = 0
    runs: int = 1
    scope: str | None = None
    weight_tensor: onnx.TensorProto | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def candidate(self) -> bool:
        return self.skip_reason is None

    def matrix(self) -> np.ndarray:
        """The Gemm/MatMul weight as the matrix in the product: `op(B)` `[K, N]`, or the left `[M, K]`."""
        if self.op == "Gemm":
            return self.weight.T if self.gemm.trans_b else self.weight
        return self.weight

    def to_dict(self) -> dict:
        """The per-layer fields of `inspect --json` (the report contract, before compression)."""
        return {"name": self.name, "op": self.op, "subgraph": self.subgraph, "runs": self.runs, "scope": self.scope,
                "weight_shape": _listed(self.weight.shape if self.weight is not None else None),
                "group": self.conv.group if self.conv else None,
                "input_shape": _listed(self.input_shape), "output_shape": _listed(self.output_shape),
                "status": "candidate" if self.candidate else "skipped", "reason": self.skip_reason,
                "macs_before": self.macs or 0, "params_before": self.params}


def _layer_weight(layer: Layer) -> np.ndarray | None:
    held = layer.__dict__.get("_weight", _FROM_MODEL)
    if held is not _FROM_MODEL:
        return held
    return None if layer.weight_tensor is None else cached_weight(layer.weight_tensor)


def _set_layer_weight(layer: Layer, value) -> None:
    if value is _FROM_MODEL:
        layer.__dict__.pop("_weight", None)
    else:
        layer.__dict__["_weight"] = value


Layer.weight = property(_layer_weight, _set_layer_weight, doc="The constant operand as stored (see `Layer`).")


def _listed(shape):
    return list(shape) if shape is not None else None


def onnx_opset(model: onnx.ModelProto, default: int) -> int:
    """The version of the default ONNX domain the model imports, `default` when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default)


def iter_graphs(graph: onnx.GraphProto, path: str | None = None
                ) -> Iterator[tuple[onnx.GraphProto, str | None]]:
    """Yield `graph` and every control-flow body below it with its path "node/attribute"."""
    yield graph, path
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                sub_path = f"{node.name}/{attr.name}" if path is None else f"{path}/{node.name}/{attr.name}"
                yield from iter_graphs(sub, sub_path)


def canonicalize(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """Return a copy of `model` with Constant weights as initializers, named nodes, and
    `auto_pad` made explicit where valid for any input size.

    `copy=False` changes `model` itself and returns it: for a model the caller loaded and owns,
    so the run holds one copy of the weights, not two.

    SAME padding depends on the input size unless every stride is 1, where the total pad is
    `δ·(k-1)` (SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning); VALID is
    always zero padding. Other SAME convs keep `auto_pad`, which the rewrites carry over.
    """
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    used_names = {n.name for g, _ in iter_graphs(out.graph) for n in g.node if n.name}
    counter = Counter()
    for graph, _ in iter_graphs(out.graph):
        _constants_to_initializers(graph)
        for node in graph.node:
            if not node.name:
                while True:
                    counter[node.op_type] += 1
                    name = f"{node.op_type}_{counter[node.op_type]}"
                    if name not in used_names:
                        break
                node.name = name
                used_names.add(name)
            if node.op_type in ("Conv", "ConvTranspose"):
                _explicit_pads(node, graph)
    initializer_names = {t.name for t in out.graph.initializer}
    kept = [i for i in out.graph.input if i.name not in initializer_names]
    if len(kept) != len(out.graph.input):
        log.info("%d initializers were also listed as graph inputs; they are weights now",
                 len(out.graph.input) - len(kept))
        del out.graph.input[:]
        out.graph.input.extend(kept)
    return out


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes become initializers of their output's name; Identity nodes of initializers
    (exporters share equal tensors through them) are bypassed: their readers read the initializer."""
    keep = []
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    aliases: dict[str, str] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            keep.append(node)
            continue
        if node.op_type == "Identity" and node.output[0] not in outputs:
            source = aliases.get(node.input[0], node.input[0])
            if source in initializers:
                aliases[node.output[0]] = source
                continue
        tensor = _constant_value(node) if node.op_type == "Constant" else None
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        initializers.add(tensor.name)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    if aliases:
        for inner, _ in iter_graphs(graph):
            for node in inner.node:
                for index, name in enumerate(node.input):
                    node.input[index] = aliases.get(name, name)


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    values = {"value_float": (np.float32, attr.f), "value_floats": (np.float32, list(attr.floats)),
              "value_int": (np.int64, attr.i), "value_ints": (np.int64, list(attr.ints))}
    if attr.name in values:
        dtype, value = values[attr.name]
        return numpy_helper.from_array(np.array(value, dtype=dtype))
    return None


def _explicit_pads(node: onnx.NodeProto, graph: onnx.GraphProto) -> None:
    attrs = {a.name: a for a in node.attribute}
    if "auto_pad" not in attrs:
        return
    mode = attrs["auto_pad"].s.decode()
    kernel = _kernel_shape(node, graph)
    if mode in ("NOTSET", "") or kernel is None:
        return
    n = len(kernel)
    strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * n
    dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * n
    if mode == "VALID":
        pads = [0] * (2 * n)
    elif node.op_type == "Conv" and all(s == 1 for s in strides):
        totals = [d * (k - 1) for d, k in zip(dilations, kernel)]
        small = [t // 2 for t in totals]
        large = [t - t // 2 for t in totals]
        pads = small + large if mode == "SAME_UPPER" else large + small
    else:
        return
    _remove_attrs(node, ("auto_pad", "pads"))
    node.attribute.append(onnx.helper.make_attribute("pads", pads))


def _remove_attrs(node: onnx.NodeProto, names) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(keep)


def _kernel_shape(node: onnx.NodeProto, graph: onnx.GraphProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return list(attr.ints)
    for init in graph.initializer:
        if len(node.input) > 1 and init.name == node.input[1]:
            return list(init.dims[2:])
    return None


def find_layers(model: onnx.ModelProto, shapes: Shapes) -> list[Layer]:
    """Every Conv/ConvTranspose/Gemm/MatMul (and quantized variant) of a canonical model.

    Each layer carries its MACs (when shapes are known) and parameters and is either a
    candidate or skipped with a plain-words reason.
    """
    layers: list[Layer] = []
    outer: dict[str, onnx.TensorProto] = {}
    _collect(model.graph, None, outer, shapes, layers)
    uses = Counter(layer.weight_name for layer in layers if layer.weight_name)
    by_weight: dict[str, list[str]] = {}
    for layer in layers:
        if layer.weight_name and uses[layer.weight_name] > 1:
            by_weight.setdefault(layer.weight_name, []).append(layer.name)
    for layer in layers:
        if layer.weight_name in by_weight:
            layer.shared_with = tuple(n for n in by_weight[layer.weight_name] if n != layer.name)
    if not layers:
        raise InputError("the model has no Conv, ConvTranspose, Gemm or MatMul node to compress")
    return layers


def _collect(graph: onnx.GraphProto, path: str | None, outer: dict, shapes: Shapes,
             layers: list[Layer]) -> None:
    scope = dict(outer)
    scope.update({t.name: t for t in graph.initializer})
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx"):
            layers.append(_layer(node, path, scope, producers, shapes))
        elif node.op_type in QUANTIZED_OPS:
            layers.append(Layer(name=node.name, op=node.op_type, inputs=tuple(node.input),
                                outputs=tuple(node.output), subgraph=path,
                                skip_reason="quantized operator: factorizing would drop its quantization"))
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                sub_path = f"{node.name}/{attr.name}" if path is None else f"{path}/{node.name}/{attr.name}"
                _collect(sub, sub_path, scope, shapes, layers)


def _layer(node: onnx.NodeProto, path: str | None, scope: dict, producers: dict,
           shapes: Shapes) -> Layer:
    layer = Layer(name=node.name, op=node.op_type, inputs=tuple(node.input),
                  outputs=tuple(node.output), subgraph=path)
    layer.output_shape = shapes.get(node.output[0])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        weight_index = 1 if node.input[1] in scope else 0 if node.input[0] in scope else None
        layer.weight_side = "left" if weight_index == 0 else "right"
    else:
        weight_index = 1 if len(node.input) > 1 and node.input[1] in scope else None
    data_index = 1 if node.op_type == "MatMul" and weight_index == 0 else 0
    layer.input_shape = shapes.get(node.input[data_index])
    if weight_index is not None:
        layer.weight_name = node.input[weight_index]
        layer.weight_tensor = scope[layer.weight_name]
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
        layer.bias_name = node.input[2]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        layer.bias_name = node.input[2]
    if node.op_type in ("Conv", "ConvTranspose") and layer.weight is not None:
        n = layer.weight.ndim - 2
        layer.conv = ConvAttrs(
            kernel_shape=tuple(attrs.get("kernel_shape", layer.weight.shape[2:])),
            strides=tuple(attrs.get("strides", [1] * n)),
            dilations=tuple(attrs.get("dilations", [1] * n)),
            pads=None if attrs.get("auto_pad", b"NOTSET").decode() not in ("NOTSET", "VALID")
            else tuple(attrs.get("pads", [0] * (2 * n))),
            auto_pad=attrs.get("auto_pad", b"NOTSET").decode(),
            group=int(attrs.get("group", 1)),
            output_padding=tuple(attrs["output_padding"]) if "output_padding" in attrs else None,
            output_shape=tuple(attrs["output_shape"]) if "output_shape" in attrs else None)
    if node.op_type == "Gemm":
        layer.gemm = GemmAttrs(trans_a=bool(attrs.get("transA", 0)), trans_b=bool(attrs.get("transB", 0)),
                               alpha=float(attrs.get("alpha", 1.0)), beta=float(attrs.get("beta", 1.0)),
                               has_c=layer.bias_name is not None)
    if layer.bias_name in scope:
        layer.bias = numpy_helper.to_array(scope[layer.bias_name])
    layer.params = sum(math.prod(scope[name].dims) for name in (layer.weight_name, layer.bias_name)
                       if name in scope)
    layer.macs = _layer_macs(layer, node, shapes)
    layer.skip_reason = _skip_reason(layer, node, scope, producers)
    return layer


def _layer_macs(layer: Layer, node: onnx.NodeProto, shapes: Shapes) -> int | None:
    if layer.output_shape is None:
        return None
    if layer.op in ("Conv", "ConvTranspose"):
        weight_shape = layer.weight.shape if layer.weight is not None else shapes.get(node.input[1])
        if weight_shape is None or layer.input_shape is None:
            return None
        return node_macs(layer.op, layer.input_shape, layer.output_shape, weight_shape)
    a_shape = shapes.get(node.input[0])
    if a_shape is None:
        return None
    if layer.op == "Gemm":
        trans_a = layer.gemm.trans_a if layer.gemm else False
        inner = a_shape[0] if trans_a else a_shape[-1]
    else:
        inner = a_shape[-1]
    return node_macs(layer.op, (), layer.output_shape, (), inner=inner)


def _skip_reason(layer: Layer, node: onnx.NodeProto, scope: dict, producers: dict) -> str | None:
    if layer.weight is None:
        source = producers.get(node.input[1] if layer.op != "MatMul" else node.input[0])
        if source is not None and source.op_type == "DequantizeLinear":
            return "quantized (QDQ) weight: factorizing would drop its quantization"
        if layer.op == "MatMul":
            return "both operands are computed at run time (activation x activation)"
        return "weight computed at run time, not a constant"
    if not np.issubdtype(layer.weight.dtype, np.floating):
        return f"weight of type {layer.weight.dtype} (quantized), not floating point"
    data_source = producers.get(node.input[0 if layer.weight_side == "right" else 1])
    if data_source is not None and data_source.op_type == "DequantizeLinear":
        return "QDQ-quantized input: factorizing would drop its quantization"
    if layer.op in ("Conv", "ConvTranspose"):
        if layer.weight.ndim < 3 or layer.weight.ndim > 5:
            return f"{layer.weight.ndim - 2}-D convolution: only 1-D, 2-D and 3-D are supported"
        per_group = layer.weight.shape[1] if layer.op == "Conv" else layer.weight.shape[0] // layer.conv.group
        if per_group == 1 and layer.conv.group > 1:
            return "depthwise convolution: one input channel per group, no channel mode to factorize"
        if layer.bias_name is not None and layer.bias_name not in scope:
            return "bias computed at run time, not a constant"
    if layer.op == "MatMul" and layer.weight.ndim != 2:
        return f"constant operand of rank {layer.weight.ndim}: only a 2-D weight matrix is factorized"
    if layer.op == "Gemm" and layer.gemm.has_c and layer.bias_name not in scope:
        return "bias C computed at run time, not a constant"
    lowered = (layer.weight.shape[0] // layer.conv.group, math.prod(layer.weight.shape[1:])) \
        if layer.conv is not None else layer.matrix().shape
    if min(lowered) < 2:
        return f"weight matrix {lowered[0]}x{lowered[1]} has rank 1 at most: nothing to factorize"
    if layer.macs is None:
        return "shape unknown: pin the input shapes with --input-shape NAME:DIMS"
    return None


def activations_before_outputs(model: onnx.ModelProto, ops: Iterable[str], through: Iterable[str] = ("Identity",)
                               ) -> dict[str, onnx.NodeProto]:
    """Graph output -> the node of type in `ops` that produces it, looking back through nodes of
    type in `through` (exporters' renaming, reshapes): e.g. the Sigmoid behind a DBNet's map."""
    ops, through = set(ops), set(through)
    producers = {output: node for node in model.graph.node for output in node.output}
    found = {}
    for output in model.graph.output:
        node = producers.get(output.name)
        while node is not None and node.op_type in through and node.input:
            node = producers.get(node.input[0])
        if node is not None and node.op_type in ops and len(node.output) == 1 and node.input:
            found[output.name] = node
    return found


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (untyped: onnxruntime infers them)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    extended.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in present)
    return extended


def model_totals(layers: list[Layer]) -> dict[str, int]:
    """Whole-model MACs (each layer's times its `runs`) and parameters over every layer; a
    shared weight is counted once."""
    sizes: dict[str, int] = {}
    for layer in layers:
        if layer.weight is not None:
            sizes[layer.weight_name] = layer.weight.size
            if layer.bias_name:
                sizes[layer.bias_name] = layer.params - layer.weight.size
    return {"macs": sum((layer.macs or 0) * layer.runs for layer in layers), "params": sum(sizes.values())}
