"""--latency-aware and --target-latency decide on measurements (a fake timer here)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from onnx_lowrank import api
from onnx_lowrank.config import Settings
from onnx_lowrank.methods import MethodSet
from onnx_lowrank.passes import (
    BudgetPass, CanonicalizePass, CountPass, FactorizePass, FindLayersPass, LatencyJudge, Pipeline, RewritePass,
    Workspace,
)
from onnx_lowrank.ranks import RankRatio

DIGITS = "models/digits_cnn.onnx"
SETTINGS = Settings(validate=False)
METHODS = MethodSet(SETTINGS)


def fake_timer(slow_layers):
    """Chains of the layers in `slow_layers` take 2 ms, their originals 1 ms; the rest the reverse."""

    def timer(model, feed):
        chain = any("/lowrank/" in node.name for node in model.graph.node)
        layer = model.graph.node[0].name.split("/lowrank/")[0]
        slow = any(layer == name for name in slow_layers)
        if chain:
            return 2.0 if slow else 0.5
        return 1.0

    return timer


def run_passes(*passes):
    model = onnx.load(DIGITS)
    workspace = Workspace(original=model, model=model, settings=SETTINGS)
    Pipeline([CanonicalizePass(), FindLayersPass(), *passes]).run(workspace)
    return workspace


def test_latency_aware_never_keeps_a_chain_measured_slower():
    judge = LatencyJudge("cpu", margin=0.05, timer=fake_timer({"/conv3/Conv", "/fc1/Gemm"}))
    workspace = run_passes(FactorizePass(METHODS, "tucker2", RankRatio(0.5), judge=judge))
    decisions = workspace.decisions
    for name in ("/conv3/Conv", "/fc1/Gemm"):
        assert decisions[name].status == "skipped" and "measured no faster" in decisions[name].reason
        assert decisions[name].latency_ms_after > decisions[name].latency_ms_before
    for name in ("/conv2/Conv", "/conv4/Conv"):
        assert decisions[name].status == "rewritten"
        assert decisions[name].latency_ms_after < decisions[name].latency_ms_before


def test_a_chain_measured_slower_once_is_timed_again_before_it_is_rejected():
    calls = collections.Counter()

    def timer(model, feed):
        """Every chain's first timed round is disturbed (3 ms), later ones are not (0.5 ms)."""
        if not any("/lowrank/" in n.name for n in model.graph.node):
            return 1.0
        key = model.SerializeToString()
        calls[key] += 1
        return 3.0 if calls[key] <= 40 else 0.5

    workspace = run_passes(FactorizePass(METHODS, "tucker2", RankRatio(0.5), judge=LatencyJudge("cpu", timer=timer)))
    assert workspace.rewritten and all(d.latency_ms_after == 0.5 for d in workspace.rewritten)


def test_margin_rejects_a_chain_only_slightly_faster():
    def timer(model, feed):
        return 0.97 if any("/lowrank/" in n.name for n in model.graph.node) else 1.0

    workspace = run_passes(FactorizePass(METHODS, "tucker2", RankRatio(0.5), judge=LatencyJudge("cpu", margin=0.05, timer=timer)))
    assert not workspace.rewritten


def test_target_latency_spends_measured_milliseconds():
    def timer(model, feed):
        # latency proportional to the weights' size: a cheap stand-in for a real machine
        return float(sum(np.prod(t.dims) for t in model.graph.initializer)) / 1e4

    judge = LatencyJudge("cpu", margin=0.0, timer=timer)
    workspace = run_passes(BudgetPass(METHODS, 0.5, "latency", ("svd", "tucker2"), multiple=8, judge=judge),
                           FactorizePass(METHODS, "tucker2", RankRatio(0.5)))
    chosen = [d for d in workspace.decisions.values() if d.ranks]
    assert chosen and all(r % 8 == 0 or r == full for d in chosen for r, full in
                          zip(d.ranks, [d.layer.weight.shape[0], d.layer.weight.shape[1]]))


def test_latency_aware_mac_budget_is_spent_on_chains_measured_faster():
    """With a judge, a MAC target is met by layers whose chains are faster; the slow layer stays dense."""
    judge = LatencyJudge("cpu", margin=0.05, timer=fake_timer({"/conv3/Conv"}))
    workspace = run_passes(BudgetPass(METHODS, 0.6, "macs", ("svd", "tucker2"), multiple=8, judge=judge),
                           FactorizePass(METHODS, "tucker2", RankRatio(0.5), judge=judge), RewritePass(), CountPass())
    assert workspace.decisions["/conv3/Conv"].ranks is None
    assert "kept dense" in workspace.decisions["/conv3/Conv"].reason
    kept = workspace.totals_after["macs"] / workspace.totals_before["macs"]
    assert abs(kept - 0.6) <= 0.02
    assert all(d.latency_ms_after < d.latency_ms_before for d in workspace.rewritten)


@pytest.mark.slow
def test_latency_aware_end_to_end_on_cpu(tmp_path):
    result = api.compress(DIGITS, tmp_path / "out.onnx",
                          Settings(target_macs=0.5, latency_aware=True, input_shape=("input:64x1x8x8",)))
    assert result.rewritten
    for layer in result.rewritten:
        assert layer.latency_ms_after < layer.latency_ms_before


def test_a_mac_target_out_of_reach_of_the_faster_chains_is_refused_with_the_reason():
    from onnx_lowrank.errors import InputError

    judge = LatencyJudge("cpu", margin=0.05, timer=fake_timer({"/conv2/Conv", "/conv3/Conv", "/conv4/Conv"}))
    with pytest.raises(InputError, match="only chains measured faster"):
        run_passes(BudgetPass(METHODS, 0.3, "macs", ("svd", "tucker2"), multiple=8, judge=judge))
