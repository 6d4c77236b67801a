"""Per-layer latency: time a layer and its candidate chains alone, on the deployment provider.

Fewer MACs is not fewer milliseconds (rank alignment, layout conversions, activation passes:
see ``shared/latency-cpu.md``), so a rewrite is judged by measuring it. Each layer becomes a
standalone one-node model (`layer_model`), each candidate chain a model with the chain in the
node's place, and `profile_layer` times them all with the layer's real input shape:

1. every model gets ``warmup`` untimed runs;
2. then ``repeats`` rounds, each running every model once, round-robin, the first model of
   the round rotating (round ``i`` starts at model ``i mod n``), so drifts in clock speed,
   heat and background load hit every model alike and none is always first or last;
3. per model, median and 90th percentile (`LatencyStats.from_samples`).

Results are kept in a `LatencyCache` (a JSON file) keyed by what decides a latency and not by
weight values: the provider, the device (CPU model and logical CPU count, or GPU name), the
intra-op thread count, the onnxruntime version and the *structure* of the timed model (its
input shapes and types, and per node the operator, attributes, constant input shapes and
how the nodes connect). Two layers of the same geometry share a measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnx_lowrank.errors import InputError
from onnx_lowrank.files import atomic_write_bytes
from onnx_lowrank.graph import Layer
from onnx_lowrank.rewrite.chain import Chain, apply_chain
from onnx_lowrank.runtime import (
    CUDA, TENSORRT, ProviderChoice, cache_root, make_session, provider_name, resolve_provider,
    runtime_max_ir_version,
)
from onnx_lowrank.timing import LatencyStats, Runner, check_counts, device_name

__all__ = [
    "DEFAULT_OPSET", "LatencyCache", "LayerTiming", "SessionTimer", "Timer", "cache_key",
    "default_cache_path", "device_name", "faster_than_original", "interleaved", "layer_model",
    "profile_layer",
]

log = logging.getLogger(__name__)

#: Opset of the standalone models when the caller does not give the source model's.
DEFAULT_OPSET = 17
_CACHE_FILE = "latency.json"
_CACHE_FORMAT = "onnx-lowrank latency cache"
_CACHE_VERSION = 1

Feed = dict[str, np.ndarray]
#: ``timer(model, feed) -> milliseconds`` of ONE run of ``model`` on ``feed``. It is called
#: with the same ``ModelProto`` objects throughout one `profile_layer` call, so an
#: implementation may keep a session per model (as `SessionTimer` does).
Timer = Callable[[onnx.ModelProto, Mapping[str, np.ndarray]], float]


# --------------------------------------------------------------------------------------------
# Standalone models


def _data_index(layer: Layer) -> int:
    return 1 if layer.op == "MatMul" and layer.weight_side == "left" else 0


def layer_model(layer: Layer, chain: Chain | None = None, opset: int = DEFAULT_OPSET
                ) -> onnx.ModelProto:
    """The layer alone as a model, or with `chain` in its place.

    The model has one input, named like the layer's data input (``layer.inputs[0]``; a MatMul
    whose weight is on the left reads ``layer.inputs[1]``) with the layer's concrete
    ``input_shape``, and one output, the layer's output (``layer.outputs[0]``, typed with
    ``output_shape`` when known). The node keeps the layer's name, its real weight and bias as
    initializers under their names, and the attributes rebuilt from the `Layer`'s fields, which
    hold all of them: Conv/ConvTranspose ``kernel_shape, strides, dilations, group`` and
    ``pads`` (or ``auto_pad`` when the pads depend on the input size), ConvTranspose
    ``output_padding``/``output_shape`` when set; Gemm ``transA, transB, alpha, beta``. No
    ``NodeProto`` is needed.

    With `chain`, the one-node model is rewritten by `apply_chain` (onnx-graphsurgeon import,
    chain, ``cleanup().toposort()``, export). Both use `opset` (pass the source model's default
    domain opset to keep it) and an IR version the installed onnxruntime loads.

    Raises:
        InputError: the layer has no constant weight, a bias computed at run time, or no known
            input shape.
    """
    if layer.weight is None:
        raise InputError(f"layer '{layer.name}' ({layer.op}): expected a constant weight, found none")
    if layer.input_shape is None:
        raise InputError(f"layer '{layer.name}' ({layer.op}): its input shape is unknown; "
                         "pin it with --input-shape NAME:DIMS")
    if layer.bias_name and layer.bias is None:
        raise InputError(f"layer '{layer.name}' ({layer.op}): expected a constant bias, "
                         f"found '{layer.bias_name}' computed at run time")
    dtype = layer.weight.dtype
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    data = layer.inputs[_data_index(layer)]
    weight_name = layer.weight_name or f"{layer.name}/weight"
    inputs = [weight_name, data] if _data_index(layer) == 1 else [data, weight_name]
    initializers = [numpy_helper.from_array(np.ascontiguousarray(layer.weight), weight_name)]
    if layer.bias is not None:
        bias_name = layer.bias_name or f"{layer.name}/bias"
        inputs.append(bias_name)
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(layer.bias), bias_name))
    node = helper.make_node(layer.op, inputs, [layer.outputs[0]], name=layer.name,
                            **_attributes(layer))
    output_shape = list(layer.output_shape) if layer.output_shape is not None else None
    graph = helper.make_graph(
        [node], f"{layer.name}/latency",
        [helper.make_tensor_value_info(data, elem, list(layer.input_shape))],
        [helper.make_tensor_value_info(layer.outputs[0], elem, output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnx-lowrank")
    model.ir_version = min(model.ir_version, runtime_max_ir_version())
    if chain is None:
        return model
    rewritten = gs.import_onnx(model)
    apply_chain(rewritten, rewritten.nodes[0], layer, chain)
    rewritten.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(rewritten, do_type_check=False)
    exported.ir_version = model.ir_version
    exported.producer_name = model.producer_name
    return exported


def _attributes(layer: Layer) -> dict:
    if layer.op in ("Conv", "ConvTranspose"):
        conv = layer.conv
        attrs = {"kernel_shape": list(conv.kernel_shape), "strides": list(conv.strides),
                 "dilations": list(conv.dilations), "group": conv.group}
        if conv.pads is not None:
            attrs["pads"] = list(conv.pads)
        else:
            attrs["auto_pad"] = conv.auto_pad
        if layer.op == "ConvTranspose":
            if conv.output_padding is not None:
                attrs["output_padding"] = list(conv.output_padding)
            if conv.output_shape is not None:
                attrs["output_shape"] = list(conv.output_shape)
        return attrs
    if layer.op == "Gemm":
        gemm = layer.gemm
        return {"transA": int(gemm.trans_a), "transB": int(gemm.trans_b),
                "alpha": float(gemm.alpha), "beta": float(gemm.beta)}
    if layer.op == "MatMul":
        return {}
    raise InputError(f"layer '{layer.name}': expected Conv, ConvTranspose, Gemm or MatMul, "
                     f"found {layer.op}")


# --------------------------------------------------------------------------------------------
# Cache keys


def _structure(model: onnx.ModelProto) -> dict:
    """What decides a model's latency, without names or weight values."""
    graph = model.graph
    ids: dict[str, str] = {}
    constants = {t.name: t for t in graph.initializer}

    def tensor(name: str):
        if not name:
            return None
        if name in constants:
            t = constants[name]
            return ["const", list(t.dims), int(t.data_type)]
        return ids.setdefault(name, f"t{len(ids)}")

    def value(info: onnx.ValueInfoProto):
        typed = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                for d in typed.shape.dim] if typed.HasField("shape") else None
        return [tensor(info.name), int(typed.elem_type), dims]

    inputs = [value(i) for i in graph.input if i.name not in constants]
    nodes = []
    for node in graph.node:
        attrs = {}
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attrs[attr.name] = ["tensor", list(attr.t.dims), int(attr.t.data_type),
                                    hashlib.sha256(attr.t.SerializeToString()).hexdigest()[:16]]
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                attrs[attr.name] = "graph"
            else:
                got = helper.get_attribute_value(attr)
                attrs[attr.name] = (got.decode() if isinstance(got, bytes)
                                    else list(got) if isinstance(got, list | tuple) else got)
        nodes.append([node.domain or "", node.op_type, attrs,
                      [tensor(n) for n in node.input], [tensor(n) for n in node.output]])
    opsets = sorted([o.domain, int(o.version)] for o in model.opset_import)
    return {"opsets": opsets, "inputs": inputs, "nodes": nodes,
            "outputs": [tensor(o.name) for o in graph.output]}


def cache_key(model: onnx.ModelProto, provider: str | ProviderChoice = "cpu",
              threads: int | None = None, device: str | None = None) -> str:
    """A stable key (SHA-256 hex) for the latency of `model` here.

    It covers the provider, `device` (default `device_name(provider)`), the intra-op thread
    count (``None``: onnxruntime's default), the onnxruntime version and the model's structure:
    input shapes and types, and per node the operator, attributes, constant input shapes
    and types and the connections between nodes. Weight values and tensor names are left
    out: the same geometry with other weights has the same key. On CUDA/TensorRT it also covers
    cuDNN's convolution algorithm search (`ProviderChoice.conv_algo_search`).
    """
    name = provider_name(provider)
    fields = {"provider": name,
              "device": device if device is not None else device_name(provider),
              "threads": int(threads) if threads is not None else "default",
              "onnxruntime": ort.__version__,
              "model": _structure(model)}
    if name in (CUDA, TENSORRT):
        fields["conv_algo_search"] = getattr(provider, "conv_algo_search", ProviderChoice.conv_algo_search)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Cache


def default_cache_path() -> pathlib.Path:
    """``latency.json`` in the tool's cache folder, `onnx_lowrank.runtime.cache_root`:
    ``$ONNX_LOWRANK_CACHE`` when set, else ``~/.cache/onnx-lowrank``."""
    return cache_root() / _CACHE_FILE


class LatencyCache:
    """Measured latencies by `cache_key`, in a JSON file.

    ``{"format": "onnx-lowrank latency cache", "version": 1,
    "entries": {key: {"median_ms": float, "p90_ms": float, "samples": [float]}}}``.

    The file is read once when the cache is made; `put` re-reads it, merges the new entry (so
    two processes sharing the file lose little) and writes it back atomically. A missing file
    is an empty cache; an unreadable or corrupt one is an empty cache with a warning and is
    replaced on the next `put`; a failed write is a warning, the entry stays in memory.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = pathlib.Path(path).expanduser() if path is not None else default_cache_path()
        self._entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("latency cache %s cannot be read (%s); starting empty", self.path, exc)
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
                raise ValueError("not an onnx-lowrank latency cache")
            if data.get("version") != _CACHE_VERSION:
                log.info("latency cache %s has version %r, expected %d; starting empty",
                         self.path, data.get("version"), _CACHE_VERSION)
                return {}
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise TypeError("'entries' is not an object")
            return {k: v for k, v in entries.items() if _stats(v) is not None}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.warning("latency cache %s is corrupt (%s); starting empty", self.path, exc)
            return {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> LatencyStats | None:
        """The stats stored under `key`, or None."""
        entry = self._entries.get(key)
        return _stats(entry) if entry is not None else None

    def put(self, key: str, stats: LatencyStats) -> None:
        """Store `stats` under `key` and write the file."""
        entry = {"median_ms": float(stats.median_ms), "p90_ms": float(stats.p90_ms),
                 "samples": [float(s) for s in stats.samples]}
        self._entries[key] = entry
        merged = self._read() if self.path.exists() else {}
        merged.update(self._entries)
        self._entries = merged
        payload = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "entries": merged}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(payload, indent=1, sort_keys=True).encode())
        except OSError as exc:
            log.warning("latency cache %s cannot be written (%s); keeping it in memory", self.path, exc)


def _stats(entry) -> LatencyStats | None:
    try:
        median, p90 = float(entry["median_ms"]), float(entry["p90_ms"])
        samples = tuple(float(s) for s in entry.get("samples", ()))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not (math.isfinite(median) and math.isfinite(p90)) or median < 0:
        return None
    return LatencyStats(median, p90, samples)


# --------------------------------------------------------------------------------------------
# Timing


class SessionTimer:
    """The real `Timer`: per model, a timing session (`onnx_lowrank.runtime.make_session`,
    ``ORT_ENABLE_ALL``) and a `onnx_lowrank.timing.Runner`, made on its first call, untimed; the
    end-to-end protocol: on CUDA/TensorRT, IO binding with the inputs and outputs on the device,
    cuDNN's algorithm search before the first counted run, the device synchronised before the
    clock is read."""

    def __init__(self, provider: str | ProviderChoice = "cpu", threads: int | None = None,
                 io_binding: bool = True):
        self.choice = resolve_provider(provider)
        self.threads = threads
        self.io_binding = io_binding
        self._runners: dict[int, tuple[onnx.ModelProto, Runner]] = {}

    def __call__(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> float:
        held = self._runners.get(id(model))
        if held is None or held[0] is not model:
            session = make_session(model, self.choice, self.threads, produced=True, timing=True,
                                   label=f"the timing model '{model.graph.name}'")
            held = (model, Runner(session, feed, self.io_binding))
            self._runners[id(model)] = held
        return held[1]()



@dataclasses.dataclass(frozen=True)
class LayerTiming:
    """Latency of a layer alone and of each candidate chain in its place.

    Attributes:
        layer: the layer's name.
        provider: the onnxruntime provider name the times are for.
        device: `device_name` of that provider.
        original: the layer's stats.
        chains: the stats of each chain, in the order given.
        from_cache: per model (original first, then the chains) whether it came from the cache.
    """

    layer: str
    provider: str
    device: str
    original: LatencyStats
    chains: list[LatencyStats]
    from_cache: tuple[bool, ...] = ()

    @property
    def speedups(self) -> list[float]:
        """``original.median_ms / chain.median_ms`` per chain (inf for a zero chain median)."""
        return [self.original.median_ms / c.median_ms if c.median_ms > 0 else math.inf
                for c in self.chains]


def _feed(model: onnx.ModelProto, seed: int) -> Feed:
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.input:
        typed = value.type.tensor_type
        shape = [d.dim_value for d in typed.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(typed.elem_type)
        feed[value.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def interleaved(models: Sequence[onnx.ModelProto], feed: Mapping[str, np.ndarray], timer: Timer,
                warmup: int, repeats: int) -> list[LatencyStats]:
    """Time `models` together: ``warmup`` untimed runs of each, then ``repeats`` rounds running
    each once, round ``i`` starting at model ``i mod n``. Stats in the order of `models`."""
    check_counts(warmup, repeats)
    for model in models:
        for _ in range(warmup):
            timer(model, feed)
    samples: list[list[float]] = [[] for _ in models]
    count = len(models)
    for i in range(repeats):
        for step in range(count):
            which = (i + step) % count
            samples[which].append(float(timer(models[which], feed)))
    return [LatencyStats.from_samples(s) for s in samples]


def profile_layer(layer: Layer, chains: Sequence[Chain], provider: str | ProviderChoice = "cpu",
                  threads: int | None = None, cache: LatencyCache | None = None, warmup: int = 5,
                  repeats: int = 30, timer: Timer | None = None, seed: int = 0,
                  opset: int = DEFAULT_OPSET, refresh: bool = False) -> LayerTiming:
    """Measure the layer alone and each chain in its place, interleaved, on `provider`.

    The models are `layer_model(layer)` and `layer_model(layer, chain)`, fed one random input
    of the layer's ``input_shape`` (standard normal from `seed`). Models found in `cache` are
    not run; the others (models of equal structure only once) are timed together by
    `interleaved` and stored in `cache`. ``cache=None`` uses no cache (pass
    ``LatencyCache()`` for the default file).

    Note that a cached original is reused against newly timed chains: its measurement comes
    from another moment. Use a fresh cache (or none) where that matters.

    Args:
        layer: a candidate layer (constant weight, known input shape).
        chains: the candidate chains for it.
        provider: ``cpu|cuda|tensorrt|auto`` or a `ProviderChoice`.
        threads: intra-op threads (None: onnxruntime's default).
        cache: where measurements are looked up and stored.
        warmup: untimed runs per model before the timed rounds.
        repeats: timed runs per model.
        timer: ``timer(model, feed) -> ms`` for one run; default a `SessionTimer`.
        seed: seed of the random input.
        opset: opset of the standalone models.
        refresh: time every model again and overwrite what `cache` held for it.

    Returns:
        `LayerTiming` with the original's and each chain's median and p90.
    """
    check_counts(warmup, repeats)
    name = provider_name(provider)
    device = device_name(name)
    models = [layer_model(layer, None, opset)] + [layer_model(layer, c, opset) for c in chains]
    keys = [cache_key(m, provider, threads, device) for m in models]
    found = {k: cache.get(k) for k in keys} if cache is not None and not refresh else {}
    todo: dict[str, onnx.ModelProto] = {}
    for key, model in zip(keys, models):
        if found.get(key) is None and key not in todo:
            todo[key] = model
    measured: dict[str, LatencyStats] = {}
    if todo:
        if timer is None:
            timer = SessionTimer(provider, threads)
        feed = _feed(models[0], seed)
        stats = interleaved(list(todo.values()), feed, timer, warmup, repeats)
        measured = dict(zip(todo, stats))
        if cache is not None:
            for key, value in measured.items():
                cache.put(key, value)
    results = [measured.get(k) or found[k] for k in keys]
    timing = LayerTiming(layer.name, name, device, results[0], results[1:],
                         tuple(k not in measured for k in keys))
    log.info("latency of %s on %s: %.3f ms; chains %s", layer.name, name,
             timing.original.median_ms,
             ", ".join(f"{c.median_ms:.3f} ms (x{s:.2f})" for c, s in zip(timing.chains, timing.speedups)))
    return timing


def faster_than_original(timing: LayerTiming, margin: float = 0.0) -> list[bool]:
    """Per chain, whether it beats the original by more than `margin` (relative):
    ``chain.median < original.median · (1 - margin)``.

    A margin of a few percent keeps machine noise from turning a tie into a rewrite
    (latency-cpu.md finding 8: on a shared machine break-even points move).

    Raises:
        InputError: `margin` outside ``[0, 1)``.
    """
    if not 0.0 <= margin < 1.0:
        raise InputError(f"latency margin must be in [0, 1), found {margin}")
    bound = timing.original.median_ms * (1.0 - margin)
    return [c.median_ms < bound for c in timing.chains]
