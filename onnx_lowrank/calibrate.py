"""Walk a model layer by layer over calibration inputs, for data-aware factorization.

The model's nodes are cut into *segments* between consecutive target layers. Each segment runs
once per calibration batch from the tensors that are live at its start, so the whole walk costs
about one forward pass, however many layers there are; only live tensors are kept. At each
target layer a visitor sees the layer's input in the ORIGINAL model (`x`) and, in sequential mode,
in the model compressed so far (`x̃`), and answers with the chain that replaces the layer (or
None to keep it); the walk then carries both worlds forward, the original through the original
node and the compressed one through the chain, so every later layer sees the errors of all
earlier ones (Zhang et al., "Accelerating Very Deep Convolutional Networks", asymmetric
reconstruction).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank import truncation
from onnx_lowrank.activations import ActivationBudget, Batches
from onnx_lowrank.costs import conv_output_shape
from onnx_lowrank.factorize import moments, patches
from onnx_lowrank.graph import Layer, activations_before_outputs, onnx_opset
from onnx_lowrank.memory import ACTIVATION_CAP, MemoryBudget
from onnx_lowrank.rewrite.chain import Chain, apply_chain
from onnx_lowrank.runtime import make_session, runtime_max_ir_version

__all__ = ["layer_moments", "layer_samples", "layer_vectors", "measured_outputs", "output_freedom", "output_gains", "vector_count",
           "walk_layers"]

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
#: Input vectors turned into moments at a time: bounds the im2col buffer (rows x D floats).
MOMENT_ROWS = 8192
#: Input vectors a layer's moments are estimated from, at most (about): a random subset past it ...
MOMENT_SAMPLE_ROWS = 65536
#: ... and at most this many multiply-adds of their accumulation, `rows · D²` (a 3x3 conv of 512
#: channels, D = 4608: 25,890 vectors, 5.6 per dimension), but never fewer than MOMENT_MIN_ROWS.
MOMENT_WORK = 2**39
MOMENT_MIN_ROWS = 8192
#: Bytes of calibration activations a walk keeps in memory by default; the rest wait on disk.
ACTIVATION_MEMORY = ACTIVATION_CAP
#: Noise values `output_gains` draws at a time (float64: 32 MiB).
NOISE_CHUNK = 1 << 22
#: Dense moments up to this size are kept even where the vectors would cost less: small either way,
#: and rank-deficient moments (fewer vectors than dimensions) are fitted a little differently in
#: the two forms (digits with 4 calibration images: 1 % of the output apart).
DENSE_BY_CHOICE = 64 << 20
#: Sample-space statistics keep at least this many vectors, or the run stops (`statistics_form`).
MIN_SAMPLE_VECTORS = 32
#: Final activations whose input, not output, `output_gains` compares.
SQUASHING = frozenset({"Sigmoid", "Softmax", "LogSoftmax", "HardSigmoid", "Tanh"})
#: Element types `output_gains` compares (0: undeclared, taken as float).
_FLOAT_TYPES = frozenset({0, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.BFLOAT16})
Visitor = Callable[[Layer, list[np.ndarray], list[np.ndarray]], Chain | None]
#: The axes an output is centred over: ``(axis,)``, ``(axis, None)`` for "every axis from `axis`
#: on" (opset < 13 softmax), or ``()``.
Centring = tuple[int | None, ...]


def _referenced(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including outer-scope names read inside its subgraphs."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
            produced = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            produced |= {t.name for t in sub.initializer}
            for inner in sub.node:
                names |= _referenced(inner) - produced
    return names


class _Segments:
    """The canonical model's main-graph nodes, with liveness, cut into runnable sub-models."""

    def __init__(self, model: onnx.ModelProto, kept: Iterable[str] = ()):
        """`kept`: tensors to keep to the end, like the graph outputs."""
        self.model = model
        self.nodes = list(model.graph.node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.reads = [_referenced(node) for node in self.nodes]
        self.last_use: dict[str, int] = {}
        for index, names in enumerate(self.reads):
            for name in names:
                self.last_use[name] = index
        for name in [output.name for output in model.graph.output] + list(kept):
            self.last_use[name] = len(self.nodes)

    def build(self, start: int, stop: int, available: dict[str, np.dtype]) -> tuple[onnx.ModelProto, list[str]] | None:
        """A model of nodes[start:stop] reading live tensors; its outputs are the tensors still needed."""
        nodes = self.nodes[start:stop]
        if not nodes:
            return None
        produced = {o for node in nodes for o in node.output}
        reads = set().union(*self.reads[start:stop])
        inputs = sorted(name for name in reads - produced if name in available)
        outputs = sorted(name for name in produced if self.last_use.get(name, -1) >= stop)
        if not outputs:
            return None
        graph = onnx.helper.make_graph(
            nodes, f"segment_{start}",
            [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(available[name]), None)
             for name in inputs],
            [onnx.ValueInfoProto(name=name) for name in outputs],
            [self.initializers[name] for name in sorted(reads & self.initializers.keys())])
        segment = onnx.helper.make_model(graph, opset_imports=self.model.opset_import)
        segment.ir_version = min(self.model.ir_version, runtime_max_ir_version())
        return segment, outputs

    def positions(self, layers: Sequence[Layer]) -> list[tuple[int, Layer]]:
        """The main-graph layers with their node positions, in topological order."""
        index = {node.name: position for position, node in enumerate(self.nodes)}
        return sorted(((index[layer.name], layer) for layer in layers if layer.name in index),
                      key=lambda item: item[0])

    def forget(self, state: dict[str, Batches], position: int) -> None:
        """Drop tensors nobody reads after `position`."""
        for name in [n for n in state if self.last_use.get(n, -1) <= position]:
            del state[name]


def _run(model: onnx.ModelProto, outputs: list[str], state: dict[str, Batches], provider: str,
         budget: ActivationBudget) -> None:
    """Run `model` batch by batch on the tensors in `state`; store its `outputs` there."""
    session = make_session(model, provider, produced=True, label=f"the calibration model '{model.graph.name}'")
    names = [i.name for i in session.get_inputs()]
    count = len(next(iter(state.values())))
    produced = {name: Batches() for name in outputs}
    for i in range(count):
        for name, value in zip(outputs, session.run(outputs, {name: state[name][i] for name in names}), strict=True):
            produced[name].append(budget.keep(value))
    state.update(produced)


def _dtypes(state: dict[str, Batches]) -> dict[str, np.dtype]:
    return {name: batches.dtype for name, batches in state.items()}


def _inputs(feeds: Sequence[Feed]) -> dict[str, Batches]:
    return {name: Batches(feed[name] for feed in feeds) for name in feeds[0]}


def _single_layer_model(model: onnx.ModelProto, layer: Layer, chain: Chain | None,
                        segments: _Segments, position: int, dtype) -> onnx.ModelProto:
    """The layer's node alone (or its chain in its place), reading its data input."""
    data = layer.inputs[1] if layer.op == "MatMul" and layer.weight_side == "left" else layer.inputs[0]
    built = segments.build(position, position + 1, {data: dtype})
    if built is None or chain is None:
        return built[0] if built else None
    graph = gs.import_onnx(built[0])
    apply_chain(graph, graph.nodes[0], layer, chain)
    graph.cleanup(remove_unused_graph_inputs=False)
    exported = gs.export_onnx(graph, do_type_check=False)
    exported.ir_version = built[0].ir_version
    return exported


def walk_layers(model: onnx.ModelProto, layers: Sequence[Layer], feeds: Sequence[Feed],
                visit: Visitor, sequential: bool = True, provider: str = "cpu",
                progress: Callable[[Iterable, int, str], Iterable] | None = None,
                activation_limit: int | None = None) -> None:
    """Visit each main-graph layer in topological order with its calibration inputs.

    `visit(layer, xs, xts)` gets the layer's data input per batch in the original model (`xs`)
    and in the model compressed so far (`xts`; the same list in independent mode) and returns
    the replacing chain or None. Cost: each segment between two layers runs once per batch
    (twice in sequential mode), plus each layer and its chain once.
    """
    segments = _Segments(model)
    order = segments.positions(layers)
    original = _inputs(feeds)
    compressed = dict(original) if sequential else None
    worlds = [original] + ([compressed] if sequential else [])
    budget = ActivationBudget(ACTIVATION_MEMORY if activation_limit is None else activation_limit)
    start = 0
    steps = progress(order, len(order), "calibrating") if progress else order
    try:
        for position, layer in steps:
            for state in worlds:
                built = segments.build(start, position, _dtypes(state))
                if built is not None:
                    _run(*built, state, provider, budget)
            data = layer.inputs[1] if layer.op == "MatMul" and layer.weight_side == "left" else layer.inputs[0]
            xs = original[data]
            xts = compressed[data] if sequential else xs
            chain = visit(layer, xs, xts)
            for state, used in ((original, None), *(((compressed, chain),) if sequential else ())):
                single = _single_layer_model(model, layer, used, segments, position, xs.dtype)
                _run(single, list(layer.outputs[:1]), state, provider, budget)
            for state in worlds:
                segments.forget(state, position)
            start = position + 1
    finally:
        budget.close()


def output_gains(model: onnx.ModelProto, layers: Sequence[Layer], feeds: Sequence[Feed],
                 relative_noise: float = 0.05, seed: int = 0, provider: str = "cpu",
                 progress: Callable[[Iterable, int, str], Iterable] | None = None,
                 activation_limit: int | None = None, noise: str = "white") -> dict[str, float]:
    """How strongly a relative error at each layer's output reaches the model's outputs.

    For layer l with output ``y = Wx`` (bias excluded), Gaussian noise ``δ`` of relative size
    ``ε = ‖δ‖/‖y‖`` (per calibration batch) is added to the layer's output, the rest of the model
    is run, and

        g_l = mean over batches and float outputs of (‖Δout‖² / ‖out‖²) / ε²

    is the layer's gain: to first order, a factorization whose relative squared output error is
    ``e_l`` costs the model ``g_l · e_l`` of relative squared output error. `noise` "white" draws
    ``δ`` i.i.d.; "truncation" takes ``δ ∝ P⊥ y``, the error of the layer's data-aware truncation
    at a representative rank (`truncation`; white where it would discard nothing), so the gain
    measures how the rest of the model carries the directions a factorization actually drops. An
    output computed by a final squashing activation (`SQUASHING`) is measured before it: a saturated
    softmax or sigmoid hides small perturbations, not the errors of a deep cut. One walk over the original model;
    each layer's suffix then runs once on the perturbed copy (about half a forward pass per layer).
    """
    outputs = measured_outputs(model)
    segments = _Segments(model, kept=outputs)
    order = segments.positions(layers)
    state = _inputs(feeds)
    budget = ActivationBudget(ACTIVATION_MEMORY if activation_limit is None else activation_limit)
    reference = None
    rng = np.random.default_rng(seed)
    gains: dict[str, float] = {}
    start = 0
    cuts = [position + 1 for position, _ in order]
    steps = progress(order, len(order), "output gains") if progress else order
    try:
        for position, layer in steps:
            built = segments.build(start, position + 1, _dtypes(state))
            if built is not None:
                _run(*built, state, provider, budget)
            segments.forget(state, position)
            start = position + 1
            name = layer.outputs[0]
            suffix = _Suffix(segments, [start, *(c for c in cuts if c > start), len(segments.nodes)])
            if reference is None:
                reference = _final_outputs(suffix, state, outputs, provider, budget)
            perturbed = dict(state)
            bases = (truncation.kept_directions(layer, (_signal(layer, y) for y in state[name]))
                     if noise == "truncation" else None)
            batches, sizes = zip(*(_perturbed(y, _signal(layer, y), relative_noise, rng) if bases is None else
                                   truncation.shifted(y, _signal(layer, y), relative_noise, layer, bases)
                                   for y in state[name]))
            perturbed[name] = budget.batches(batches)
            changed = _final_outputs(suffix, perturbed, outputs, provider, budget)
            ratios = [np.sum((c - r) ** 2) / max(np.sum(r ** 2), 1e-30) / e ** 2
                      for out in reference for r, c, e in zip(reference[out], changed[out], sizes, strict=True)
                      if e > 0]
            if ratios:
                gains[layer.name] = float(np.mean(ratios))
    finally:
        budget.close()
    return gains


def output_freedom(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Independent numbers per sample in what `output_gains` compares, for its least telling
    float output: the output's elements past axis 0, less one per softmax row (the centring
    removes that direction). The gains average one ratio per output, so the output with the
    fewest numbers decides how noisy they are.

    A two-class softmax gives 1, so each perturbed sample says little about a gain; a text
    recogniser's ``[T, C]`` logits give ``T·(C-1)``. Outputs of unknown shape are passed over;
    None when no output's shape is known. Float-ness is read from the declared graph outputs
    (`output_gains` checks the dtype it gets; an undeclared type counts as float).
    """
    declared = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    counts = []
    for name, centred in measured_outputs(model).items():
        shape = shapes.get(name)
        if declared.get(name, onnx.TensorProto.FLOAT) not in _FLOAT_TYPES or not shape:
            continue                                  # compared never (int), or a scalar
        if any(not isinstance(d, int) or d <= 0 for d in shape):
            continue
        per_sample = math.prod(shape[1:])
        axes = _centre_axes(centred, len(shape))
        if axes and 0 not in axes:
            per_sample -= per_sample // math.prod(shape[a] for a in axes)
        counts.append(per_sample)
    return min(counts) if counts else None


def measured_outputs(model: onnx.ModelProto) -> dict[str, Centring]:
    """The graph outputs, each taken before its producer if that is a squashing activation, with
    the axes to centre it over: a softmax ignores a shift along its axis (opset < 13: the axes
    from `axis` on), so that part of a logit error does not count."""
    squashed = activations_before_outputs(model, SQUASHING)
    opset = onnx_opset(model, 13)
    measured: dict[str, Centring] = {}
    for output in model.graph.output:
        node = squashed.get(output.name)
        if node is None:
            measured.setdefault(output.name, ())
            continue
        centred: Centring = ()
        if node.op_type in ("Softmax", "LogSoftmax"):
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
            centred = (axis,) if opset >= 13 else (axis, None)
        measured.setdefault(node.input[0], centred)
    return measured


def _signal(layer: Layer, y: np.ndarray) -> np.ndarray:
    """The layer's output without its bias (what the factorization's relative error refers to)."""
    if layer.bias is None:
        return y
    if layer.op in ("Conv", "ConvTranspose"):
        return y - layer.bias.reshape((1, -1) + (1,) * (y.ndim - 2))
    return y - layer.bias


def _perturbed(y: np.ndarray, signal: np.ndarray, relative: float, rng: np.random.Generator):
    """`y` plus Gaussian noise of norm `relative·‖signal‖`, and the relative size realised.

    The noise is drawn in chunks of `NOISE_CHUNK` values, twice from the same generator state
    (its norm first, then the values): the same draws as one call, without a float64 copy of
    the whole batch (a VGG16 layer's output at 240 x 240, batch 16: 470 MB).
    """
    energy = np.linalg.norm(signal)
    start_state = rng.bit_generator.state
    size = y.size
    squares = 0.0
    for begin in range(0, size, NOISE_CHUNK):
        squares += float(np.sum(np.square(rng.standard_normal(min(NOISE_CHUNK, size - begin)))))
    end_state = rng.bit_generator.state
    rng.bit_generator.state = start_state
    scale = relative * energy / max(np.sqrt(squares), 1e-30)
    flat, out = y.reshape(-1), np.empty(size, dtype=y.dtype)
    for begin in range(0, size, NOISE_CHUNK):
        stop = min(begin + NOISE_CHUNK, size)
        out[begin:stop] = flat[begin:stop] + scale * rng.standard_normal(stop - begin)
    rng.bit_generator.state = end_state
    return out.reshape(y.shape), relative if energy > 0 else 0.0


class _Suffix:
    """The nodes after a layer, run as the walk's segments (between the later layers) one after
    the other: each segment's sub-model holds its own weights only, so running the rest of the
    model never builds a copy of all its later weights (for the first layer: nearly the whole
    model), nor serialises it once per layer."""

    def __init__(self, segments: _Segments, bounds: list[int]):
        self.segments = segments
        self.bounds = sorted(set(bounds))

    def run(self, state: dict[str, Batches], provider: str, budget: ActivationBudget) -> None:
        """Run the suffix on `state` (changed: the tensors produced, those no longer read dropped)."""
        for begin, end in zip(self.bounds, self.bounds[1:]):
            built = self.segments.build(begin, end, _dtypes(state))
            if built is not None:
                _run(*built, state, provider, budget)
            self.segments.forget(state, end - 1)


def _final_outputs(suffix: _Suffix, state: dict[str, Batches], outputs: dict[str, Centring], provider: str,
                   budget: ActivationBudget) -> dict[str, list[np.ndarray]]:
    """The model's float outputs per batch (centred as `measured_outputs` says), running
    `suffix` (the nodes after a layer) on a copy of `state`."""
    state = dict(state)
    suffix.run(state, provider, budget)
    return {name: [_centred(np.asarray(v, dtype=np.float64), outputs[name]) for v in state[name]]
            for name in outputs if name in state and np.issubdtype(state[name].dtype, np.floating)}


def _centre_axes(centring: Centring, ndim: int) -> tuple[int, ...]:
    """The non-negative axes a `Centring` names for a rank-`ndim` value."""
    if not centring:
        return ()
    if centring[-1] is None:
        return tuple(range(centring[0] % ndim, ndim))
    return tuple(axis % ndim for axis in centring)


def _centred(value: np.ndarray, centring: Centring) -> np.ndarray:
    """`value` minus its mean over the axes `centring` names (`_centre_axes`)."""
    axes = _centre_axes(centring, value.ndim)
    return value - value.mean(axis=axes, keepdims=True) if axes else value


def _conv_pads(layer: Layer, x: np.ndarray) -> tuple[int, ...]:
    """The conv's explicit pads for the input `x` (a SAME `auto_pad` resolved for its size)."""
    conv = layer.conv
    if conv.pads is not None:
        return conv.pads
    return patches.same_pads(x.shape[2:], conv.kernel_shape, conv.strides, conv.dilations, conv.auto_pad)


def vector_count(layer: Layer, x: np.ndarray) -> int:
    """How many vectors (per group) `layer_vectors` yields for `x`, without forming them.

    Conv: ``B · Π out_n``, the output positions (`costs.conv_output_shape`).
    """
    if layer.op == "Conv":
        conv = layer.conv
        ones = (1,) * len(conv.kernel_shape)
        shape = conv_output_shape(x.shape, layer.weight.shape, conv.strides or ones, conv.dilations or ones,
                                  _conv_pads(layer, x))
        return x.shape[0] * math.prod(shape[2:])
    if layer.op == "Gemm":
        return x.shape[1] if layer.gemm.trans_a else x.shape[0]
    if layer.weight_side == "right":
        return math.prod(x.shape[:-1])
    return math.prod(x.shape[:-2]) * x.shape[-1]


def layer_vectors(layer: Layer, x: np.ndarray, max_rows: int | None = None,
                  choose: Callable[[int], np.ndarray] | None = None):
    """The vectors the layer's weight multiplies, as `[groups, n, D]` chunks (of each chunk, the
    rows the mask `choose(rows)` keeps, when given).

    Conv: im2col patches per group (`D = (S/g)·Πk`); Gemm: rows of `op(A)`; MatMul with the
    weight on the right: rows of `x` (`[..., K]` flattened); on the left: columns of `x`.
    """
    if layer.op == "Conv":
        conv = layer.conv
        yield from patches.iter_patches(x, conv.kernel_shape, conv.strides, conv.dilations, _conv_pads(layer, x),
                                     conv.group, max_rows=max_rows, choose=choose)
        return
    if layer.op == "Gemm":
        rows = x.T if layer.gemm.trans_a else x
    elif layer.weight_side == "right":
        rows = x.reshape(-1, x.shape[-1])
    else:
        rows = np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
    step = max_rows or len(rows)
    for begin in range(0, len(rows), step):
        chunk = rows[begin:begin + step]
        yield (chunk if choose is None else chunk[choose(len(chunk))])[None]


def layer_moments(layer: Layer, xs: Sequence[np.ndarray], xts: Sequence[np.ndarray] | None,
                  budget: MemoryBudget | None = None, rows: int | None = None):
    """Second moments of the layer's input vectors over all batches (paired with `xts` if given).

    A layer that sees more than about `rows` vectors in the whole calibration set (a conv at high
    resolution: one per output position and image) uses a uniform random subset of them, the
    same positions in `xs` and `xts`, seeded by the layer's name: neighbouring patches are
    strongly correlated, so the subset estimates the moments as well at a fraction of the cost.
    By default `rows` is `MOMENT_SAMPLE_ROWS`, fewer for wide inputs (`MOMENT_WORK`).

    The form follows the memory they need (`statistics_form`): the vectors themselves
    (`SampleMoments`) when there are fewer of them than dimensions (a 25088-wide dense head sees
    one vector per calibration sample; a transformer's MatMul one per token), else dense ``D x D``
    moments (`factorize.moments.Moments`) when they fit `budget.statistics`, else as many vectors
    as fit.
    """
    vectors = vector_count(layer, xs[0]) * len(xs)
    if rows is None:
        rows = min(MOMENT_SAMPLE_ROWS, max(MOMENT_MIN_ROWS, MOMENT_WORK // vector_shape(layer)[1] ** 2))
    capacity = statistics_form(layer, vectors, xts is not None, budget, every=vectors <= rows)
    accumulated = moments.Moments() if capacity is None else moments.SampleMoments(capacity)
    target = min(rows, vectors) if capacity is None else min(rows, capacity)
    keep = min(1.0, target / vectors) if capacity is None or capacity >= vectors else 0.95 * target / vectors
    for p, pt in _sampled_vectors(layer, xs, xts, keep, np.random.default_rng(zlib.crc32(layer.name.encode()))):
        if capacity is not None:
            p, pt = p[:, :accumulated.room], None if pt is None else pt[:, :accumulated.room]
        accumulated.add(p, pt)
    return accumulated


def layer_samples(layer: Layer, xs: Sequence[np.ndarray], xts: Sequence[np.ndarray], rows: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """About `rows` of the layer's input vectors, a uniform random subset (seeded by the layer's
    name, other draws than `layer_moments`'), in the original model and in the compressed one:
    ``(p, p~)``, each ``[groups, n, D]`` float32. For fits that need the vectors themselves
    (activation-aware fitting: a nonlinearity has no second-moment form)."""
    keep = min(1.0, rows / max(vector_count(layer, xs[0]) * len(xs), 1))
    rng = np.random.default_rng(zlib.crc32(layer.name.encode()) + 1)
    pairs = list(_sampled_vectors(layer, xs, xts, keep, rng))
    return tuple(np.concatenate([pair[i] for pair in pairs], axis=1).astype(np.float32) for i in (0, 1))


def _sampled_vectors(layer: Layer, xs: Sequence[np.ndarray], xts: Sequence[np.ndarray] | None, keep: float,
                     rng: np.random.Generator):
    """Chunks ``(p, p~)`` of the layer's input vectors over all batches, each kept with probability
    `keep` (the same positions in both worlds; ``p~`` None without `xts`). Only kept vectors are
    formed: the compressed world's chunk replays the mask drawn for the original's."""
    mask = [np.ones(0, bool)]

    def draw(rows: int) -> np.ndarray:
        mask[0] = rng.random(rows) < keep
        return mask[0]

    def replay(rows: int) -> np.ndarray:
        return mask[0]

    subset = keep < 1.0
    for index, x in enumerate(xs):
        originals = layer_vectors(layer, x, MOMENT_ROWS, draw if subset else None)
        if xts is None:
            chunks = ((p, None) for p in originals)
        else:
            chunks = zip(originals, layer_vectors(layer, xts[index], MOMENT_ROWS, replay if subset else None),
                         strict=True)
        yield from chunks


def statistics_form(layer: Layer, vectors: int, paired: bool, budget: MemoryBudget | None,
                    every: bool = False) -> int | None:
    """None for dense moments, else how many vectors sample-space statistics keep.

    Per group, dense moments hold 1 (3 paired) ``D x D`` float64 matrices, and their fit about 4
    more at a time: ``8·D²·(g·k + 4)`` bytes. Sample-space statistics hold the vectors (and their
    ``p~``) and as much again while fitted, plus an ``n x n`` Gram matrix:
    ``8·n·D·(g·k + 4) + 8·n²``. When `every` vector is used (no subset), the dense form would
    take more than `DENSE_BY_CHOICE` and keeping all `vectors` costs less (n well below D), the
    vectors are kept: the same fit for less memory and time. Past the budget, as many vectors as
    fit. Raises `InputError` (naming --max-memory) when not even `MIN_SAMPLE_VECTORS` vectors fit.
    """
    if budget is None:
        return None
    groups, dim = vector_shape(layer)
    matrices = groups * (3 if paired else 1) + 4
    dense = 8 * dim * dim * matrices
    samples = 8 * vectors * dim * matrices + 8 * vectors * vectors
    if every and dense > DENSE_BY_CHOICE and samples < dense and samples <= budget.statistics:
        return vectors
    if dense <= budget.statistics:
        return None
    fit = min(int(budget.statistics / (8 * dim * matrices)), int(math.sqrt(budget.statistics / 8)))
    if fit < MIN_SAMPLE_VECTORS:
        raise budget.refuse(f"layer '{layer.name}': calibration statistics of its {dim}-wide input",
                            8 * MIN_SAMPLE_VECTORS * dim * matrices, budget.statistics,
                            "raise --max-memory or leave the layer out with --skip")
    log.info("%s: %d-wide input, %s of dense moments: keeping up to %d of its %d vectors instead",
             layer.name, dim, f"{dense / 2**30:.1f} GiB", fit, vectors)
    return fit


def vector_shape(layer: Layer) -> tuple[int, int]:
    """(groups, D) of the vectors `layer_vectors` yields."""
    if layer.op == "Conv":
        return layer.conv.group, math.prod(layer.weight.shape[1:])
    rows, cols = layer.matrix().shape
    return 1, (cols if layer.weight_side == "left" else rows)
