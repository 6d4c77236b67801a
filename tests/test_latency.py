"""Per-layer latency profiling: standalone layer and chain models, the cache, the interleaved
timing loop (with an injected fake timer), the faster-than-original decision.

Nothing here asserts a real timing beyond "positive, p90 >= median": timings are the
machine's, the logic around them is ours.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import (
    conv_model,
    fit,
    gemm_model,
    make_model,
    matmul_model,
    relative_error,
    run,
)
from onnx import TensorProto, helper

from onnx_lowrank.api import inspect
from onnx_lowrank.errors import InputError
from onnx_lowrank.latency import (
    LatencyCache,
    LayerTiming,
    cache_key,
    default_cache_path,
    faster_than_original,
    layer_model,
    profile_layer,
)
from onnx_lowrank.ranks import FixedRank, RankRatio
from onnx_lowrank.rewrite.chain import apply_chain
from onnx_lowrank.runtime import CPU, CUDA, ProviderChoice, runtime_max_ir_version
from onnx_lowrank.timing import LatencyStats

# The standalone model runs the same onnxruntime kernel on the same input as the full model;
# float32 rounding may differ only by the kernel's blocking, far below this.
SAME_RTOL = 1e-6
FULL_RANK_RTOL = 1e-5  # float32 rounding of a few chained products (as in conftest)


def in_context(single: onnx.ModelProto) -> onnx.ModelProto:
    """`single`'s one node between a Relu on its data input and a Tanh on its output; the
    node's output `y` stays a graph output beside the Tanh's `z`."""
    node = single.graph.node[0]
    data = single.graph.input[0]
    typed = data.type.tensor_type
    shape = [d.dim_value for d in typed.shape.dim]
    nodes = [helper.make_node("Relu", ["inp"], [data.name], name="pre"), node,
             helper.make_node("Tanh", ["y"], ["z"], name="post")]
    return make_model(nodes, [helper.make_tensor_value_info("inp", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
                       helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                      list(single.graph.initializer))


def only_layer(model: onnx.ModelProto):
    layers = [layer for layer in inspect(model).layers if layer.candidate]
    assert len(layers) == 1
    return layers[0]


def with_chain(model: onnx.ModelProto, layer, chain) -> onnx.ModelProto:
    """The full model with `chain` in the layer's place (the rewrite the tool would make)."""
    graph = gs.import_onnx(model)
    node = next(n for n in graph.nodes if n.name == layer.name)
    apply_chain(graph, node, layer, chain)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    return out


def conv_case(rng, input_shape=(1, 12, 11, 11), seed_weight=None):
    weight = (seed_weight or rng).standard_normal((16, 6, 3, 3))
    return conv_model(input_shape, weight, rng.standard_normal(16), strides=[2, 2], group=2,
                      pads=[1, 1, 1, 1])


def gemm_case(rng):
    return gemm_model((3, 20), rng.standard_normal((12, 20)), rng.standard_normal(12), transB=1)


def matmul_case(rng):
    return matmul_model((2, 5, 20), rng.standard_normal((20, 12)))


def matmul_left_case(rng):
    return matmul_model((2, 10, 7), rng.standard_normal((6, 10)), side="left")


CASES = {"conv": (conv_case, "tucker2"), "gemm": (gemm_case, "svd"),
         "matmul": (matmul_case, "svd"), "matmul-left": (matmul_left_case, "svd")}


# ---------------------------------------------------------------------------------------------
# Standalone models


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_model_reproduces_the_layer_inside_its_model(case, rng):
    build, method = CASES[case]
    full = in_context(build(rng))
    layer = only_layer(full)
    inp = rng.standard_normal(tuple(d.dim_value for d in full.graph.input[0].type.tensor_type.shape.dim))
    inp = inp.astype(np.float32)
    _, y = run(full, {"inp": inp})
    data = layer.inputs[1] if layer.weight_side == "left" else layer.inputs[0]

    alone = layer_model(layer)
    onnx.checker.check_model(alone, full_check=True)
    assert alone.ir_version <= runtime_max_ir_version()
    assert [(o.domain, o.version) for o in alone.opset_import] == [("", 17)]
    assert [i.name for i in alone.graph.input] == [data]
    assert tuple(d.dim_value for d in alone.graph.input[0].type.tensor_type.shape.dim) == layer.input_shape
    assert [o.name for o in alone.graph.output] == ["y"]
    (got,) = run(alone, {data: np.maximum(inp, 0)})
    assert got.shape == y.shape == layer.output_shape
    assert relative_error(y, got) < SAME_RTOL

    chain = fit(layer, method, FixedRank(4)).chain
    chained = layer_model(layer, chain)
    onnx.checker.check_model(chained, full_check=True)
    assert chained.ir_version <= runtime_max_ir_version()
    assert len(chained.graph.node) == len(chain.stages)
    assert [i.name for i in chained.graph.input] == [data]
    _, y_chain = run(with_chain(full, layer, chain), {"inp": inp})
    (got_chain,) = run(chained, {data: np.maximum(inp, 0)})
    assert relative_error(y_chain, got_chain) < SAME_RTOL
    assert relative_error(y, got_chain) > 1e-3  # rank 4 truncates: a different model

    exact = layer_model(layer, fit(layer, method, RankRatio(1.0)).chain)
    (got_exact,) = run(exact, {data: np.maximum(inp, 0)})
    assert relative_error(y, got_exact) < FULL_RANK_RTOL


def test_layer_model_keeps_a_given_opset(rng):
    layer = only_layer(conv_case(rng))
    assert [o.version for o in layer_model(layer, opset=13).opset_import] == [13]


def test_layer_model_needs_a_shape_and_a_weight(rng):
    layer = only_layer(conv_case(rng))
    with pytest.raises(InputError, match="input shape is unknown"):
        layer_model(dataclasses.replace(layer, input_shape=None))
    with pytest.raises(InputError, match="constant weight"):
        layer_model(dataclasses.replace(layer, weight=None))


# ---------------------------------------------------------------------------------------------
# Cache keys and the cache file


def test_keys_follow_the_structure_not_the_weights(rng):
    layer = only_layer(conv_case(rng))
    model = layer_model(layer)
    base = cache_key(model, "cpu", 1)
    assert base == cache_key(model, "cpu", 1)

    other_weights = only_layer(conv_case(rng, seed_weight=np.random.default_rng(99)))
    assert not np.allclose(other_weights.weight, layer.weight)
    assert cache_key(layer_model(other_weights), "cpu", 1) == base
    chain_a = layer_model(layer, fit(layer, "tucker2", FixedRank(4)).chain)
    chain_b = layer_model(other_weights, fit(other_weights, "tucker2", FixedRank(4)).chain)
    assert cache_key(chain_a, "cpu", 1) == cache_key(chain_b, "cpu", 1)

    assert cache_key(model, "cuda", 1) != base
    assert cache_key(model, "cpu", 2) != base
    assert cache_key(model, "cpu", None) != base
    assert cache_key(model, "cpu", 1, device="another cpu") != base
    bigger = only_layer(conv_case(rng, input_shape=(1, 12, 13, 13)))
    assert cache_key(layer_model(bigger), "cpu", 1) != base
    chain_2 = layer_model(layer, fit(layer, "tucker2", FixedRank(2)).chain)
    assert cache_key(chain_2, "cpu", 1) != cache_key(chain_a, "cpu", 1)
    assert cache_key(chain_a, "cpu", 1) != base


def test_cudnn_algorithm_search_is_in_a_gpu_key(rng):
    model = layer_model(only_layer(conv_case(rng)))
    exhaustive = ProviderChoice("cuda", (CUDA, CPU))
    heuristic = ProviderChoice("cuda", (CUDA, CPU), conv_algo_search="HEURISTIC")
    assert cache_key(model, "cuda", 1, device="gpu") == cache_key(model, exhaustive, 1, device="gpu")
    assert cache_key(model, heuristic, 1, device="gpu") != cache_key(model, exhaustive, 1, device="gpu")
    cpu = ProviderChoice("cpu", (CPU,), conv_algo_search="HEURISTIC")  # no cuDNN on a CPU
    assert cache_key(model, cpu, 1, device="c") == cache_key(model, "cpu", 1, device="c")


def test_conv_attributes_are_in_the_key(rng):
    weight = rng.standard_normal((8, 4, 3, 3))
    keys = {cache_key(layer_model(only_layer(conv_model((1, 4, 9, 9), weight, **attrs))), "cpu", 1)
            for attrs in ({}, {"strides": [2, 2]}, {"pads": [1, 1, 1, 1]}, {"dilations": [2, 2]})}
    assert len(keys) == 4


def test_cache_round_trips(tmp_path):
    path = tmp_path / "sub" / "latency.json"
    cache = LatencyCache(path)
    assert cache.get("k") is None
    stats = LatencyStats(1.5, 2.5, (1.0, 1.5, 2.5))
    cache.put("k", stats)
    assert cache.get("k") == stats
    again = LatencyCache(path)
    assert again.get("k") == stats and len(again) == 1
    assert json.loads(path.read_text())["entries"]["k"]["median_ms"] == 1.5
    # a second writer's entries are merged, not lost
    LatencyCache(path).put("other", LatencyStats(3.0, 4.0))
    cache.put("k2", stats)
    assert {"k", "k2", "other"} <= set(json.loads(path.read_text())["entries"])


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"format": "x"}',
                                     b'{"format": "onnx-lowrank latency cache", "version": 1, "entries": 3}',
                                     b"\xff\xfe"])
def test_corrupt_cache_is_tolerated(tmp_path, caplog, content):
    path = tmp_path / "latency.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank.latency"):
        cache = LatencyCache(path)
    assert len(cache) == 0
    assert any("corrupt" in r.message for r in caplog.records)
    cache.put("k", LatencyStats(1.0, 1.0))
    assert LatencyCache(path).get("k") == LatencyStats(1.0, 1.0)


def test_bad_entries_are_dropped(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"format": "onnx-lowrank latency cache", "version": 1,
                                "entries": {"good": {"median_ms": 1, "p90_ms": 2},
                                            "bad": {"median_ms": "x"}, "worse": 7}}))
    cache = LatencyCache(path)
    assert cache.get("good") == LatencyStats(1.0, 2.0) and cache.get("bad") is None
    assert cache.get("worse") is None


def test_unwritable_cache_keeps_entries_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = LatencyCache(blocker / "latency.json")  # its folder cannot be made
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank.latency"):
        cache.put("k", LatencyStats(1.0, 1.0))
    assert cache.get("k") == LatencyStats(1.0, 1.0)
    assert any("cannot be written" in r.message for r in caplog.records)


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path / "models"))
    assert default_cache_path() == tmp_path / "models" / "latency.json"
    monkeypatch.delenv("ONNX_LOWRANK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / ".cache" / "onnx-lowrank" / "latency.json"


# ---------------------------------------------------------------------------------------------
# The timing loop, with a fake timer


class FakeTimer:
    """A run "takes" the model's parameter count / 100 ms; each call is recorded."""

    def __init__(self):
        self.calls: list[int] = []

    @staticmethod
    def size(model: onnx.ModelProto) -> int:
        return int(sum(np.prod(t.dims) for t in model.graph.initializer))

    def __call__(self, model, feed):
        (value,) = feed.values()
        assert value.shape == tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
        self.calls.append(self.size(model))
        return self.size(model) / 100


def conv_with_chains(rng):
    layer = only_layer(conv_case(rng))
    chains = [fit(layer, "tucker2", FixedRank(r)).chain for r in (2, 4)]
    sizes = [FakeTimer.size(layer_model(layer, c)) for c in (None, *chains)]
    assert len(set(sizes)) == 3
    return layer, chains, sizes


def test_profile_returns_the_fake_medians_interleaved(rng):
    layer, chains, sizes = conv_with_chains(rng)
    timer = FakeTimer()
    timing = profile_layer(layer, chains, timer=timer, warmup=2, repeats=4)
    assert timing.original.median_ms == pytest.approx(sizes[0] / 100)
    assert [c.median_ms for c in timing.chains] == pytest.approx([s / 100 for s in sizes[1:]])
    assert timing.original.p90_ms == timing.original.median_ms
    assert len(timing.original.samples) == 4
    assert timing.speedups == pytest.approx([sizes[0] / s for s in sizes[1:]])
    assert timing.layer == layer.name and timing.provider == "CPUExecutionProvider"
    assert timing.from_cache == (False, False, False)

    warm, timed = timer.calls[:6], timer.calls[6:]
    assert warm == [sizes[0]] * 2 + [sizes[1]] * 2 + [sizes[2]] * 2
    assert len(timed) == 12
    rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
    for index, one in enumerate(rounds):
        assert sorted(one) == sorted(sizes)  # every model once per round
        assert one[0] == sizes[index % 3]  # the first model rotates


def test_profile_uses_the_cache(rng, tmp_path):
    layer, chains, _ = conv_with_chains(rng)
    cache = LatencyCache(tmp_path / "latency.json")
    first = profile_layer(layer, chains, cache=cache, timer=FakeTimer(), warmup=1, repeats=3)
    assert len(cache) == 3

    idle = FakeTimer()
    second = profile_layer(layer, chains, cache=LatencyCache(tmp_path / "latency.json"),
                           timer=idle, warmup=1, repeats=3)
    assert idle.calls == []
    assert second.original == first.original and second.chains == first.chains
    assert second.from_cache == (True, True, True)

    # a new chain: only it is timed
    new = fit(layer, "tucker2", FixedRank(3)).chain
    partial = FakeTimer()
    third = profile_layer(layer, [chains[0], new], cache=cache, timer=partial, warmup=1, repeats=3)
    new_size = FakeTimer.size(layer_model(layer, new))
    assert set(partial.calls) == {new_size} and len(partial.calls) == 4
    assert third.from_cache == (True, True, False)
    assert third.chains[1].median_ms == pytest.approx(new_size / 100)


def test_equal_structures_are_timed_once(rng):
    layer, chains, _ = conv_with_chains(rng)
    timer = FakeTimer()
    timing = profile_layer(layer, [chains[0], chains[0]], timer=timer, warmup=0, repeats=2)
    assert len(timer.calls) == 4
    assert timing.chains[0] == timing.chains[1]


def test_profile_checks_its_counts(rng):
    layer, chains, _ = conv_with_chains(rng)
    with pytest.raises(InputError, match="repeats"):
        profile_layer(layer, chains, timer=FakeTimer(), repeats=0)
    with pytest.raises(InputError, match="warm-up"):
        profile_layer(layer, chains, timer=FakeTimer(), warmup=-1)


def test_faster_than_original_with_margin():
    timing = LayerTiming("l", "CPUExecutionProvider", "cpu", LatencyStats(10.0, 11.0),
                         [LatencyStats(9.8, 10.0), LatencyStats(8.0, 9.0), LatencyStats(10.0, 10.0),
                          LatencyStats(12.0, 13.0)])
    assert faster_than_original(timing) == [True, True, False, False]
    assert faster_than_original(timing, margin=0.05) == [False, True, False, False]
    assert faster_than_original(timing, margin=0.25) == [False, False, False, False]
    with pytest.raises(InputError, match="margin"):
        faster_than_original(timing, margin=1.0)


# ---------------------------------------------------------------------------------------------
# One real measurement


def test_real_profile_of_a_small_conv(rng, tmp_path):
    layer = only_layer(conv_model((1, 16, 16, 16), rng.standard_normal((16, 16, 3, 3)),
                                  rng.standard_normal(16), pads=[1, 1, 1, 1]))
    chain = fit(layer, "tucker2", FixedRank(8)).chain
    cache = LatencyCache(tmp_path / "latency.json")
    timing = profile_layer(layer, [chain], provider="cpu", threads=1, cache=cache, warmup=2, repeats=5)
    for stats in (timing.original, *timing.chains):
        assert stats.median_ms > 0
        assert stats.p90_ms >= stats.median_ms
        assert len(stats.samples) == 5
    assert timing.speedups[0] > 0
    assert len(cache) == 2
