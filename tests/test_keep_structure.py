"""--keep-structure (projection without rewrite) and the numpy `project` API."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import run
from onnx_lowrank import api
from onnx_lowrank.config import Settings
from onnx_lowrank.api import project

DIGITS = "models/digits_cnn.onnx"


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "tucker2", "cp", "versatile", "versatile-channel"])
def test_keep_structure_equals_the_rewrite(tmp_path, method):
    feed = {"input": np.load("models/digits_test.npz")["input"][:32]}
    outputs = {}
    for keep in (False, True):
        settings = Settings(method=method, rank_ratio=0.5, keep_structure=keep, validate=False)
        workspace = api.compress(DIGITS, tmp_path / f"{keep}.onnx", settings)
        model = onnx.load(str(tmp_path / f"{keep}.onnx"))
        outputs[keep] = run(model, feed)[0]
        if keep:
            original = onnx.load(DIGITS)
            assert [n.op_type for n in model.graph.node] == [n.op_type for n in original.graph.node]
            assert workspace.totals_after["macs"] == workspace.totals_before["macs"]
    scale = np.abs(outputs[False]).max()
    np.testing.assert_allclose(outputs[True], outputs[False], atol=1e-5 * scale, rtol=0)


def test_project_matrix_is_the_truncated_svd(rng):
    weight = rng.standard_normal((20, 12)).astype(np.float32)
    projected = project(weight, "tucker2", 5)
    u, s, vt = np.linalg.svd(weight.astype(np.float64))
    expected = (u[:, :5] * s[:5]) @ vt[:5]
    assert projected.dtype == np.float32 and projected.shape == weight.shape
    np.testing.assert_allclose(projected, expected, atol=1e-5)


@pytest.mark.parametrize("method,rank", [("svd", 4), ("spatial-svd", 6), ("tucker2", (4, 3)), ("tiled-svd", 2)])
def test_project_conv_keeps_shape_and_is_idempotent(rng, method, rank):
    weight = rng.standard_normal((8, 6, 3, 3))
    once = project(weight, method, rank)
    assert once.shape == weight.shape
    np.testing.assert_allclose(project(once, method, rank), once, atol=1e-8)
    assert np.linalg.norm(weight - once) < np.linalg.norm(weight)


def test_project_full_rank_is_identity(rng):
    weight = rng.standard_normal((6, 4, 3, 3))
    np.testing.assert_allclose(project(weight, "tucker2", (6, 4)), weight, atol=1e-10)
