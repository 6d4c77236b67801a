"""The calibration walk and data-aware compression through the pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, fit, make_model, prepared, relative_error, run
from onnx_lowrank import api, calibrate
from onnx_lowrank.config import Settings
from onnx_lowrank.factorize.moments import Moments
from onnx_lowrank.passes import OutputGainsPass
from onnx_lowrank.passes.statistics import MAX_GAIN_SAMPLES, gain_samples
from onnx_lowrank.ranks import FixedRank


def residual_model(rng, channels=16, spatial=10):
    """conv0 -> relu -> conv1 (+ skip from relu) -> relu -> conv2: a DAG with a live skip tensor."""
    inits = [numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) / 12).astype(np.float32), f"w{i}")
             for i in range(3)]
    inits.append(numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b1"))
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "r0"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, spatial, spatial])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def anisotropic_feeds(rng, count, channels=16, spatial=10):
    """Inputs whose channels are strongly correlated: a few directions carry most of the energy.

    The mixing is the same for every call (its own seed), so calibration and evaluation sets
    come from one distribution.
    """
    mixing = np.random.default_rng(7).standard_normal((channels, channels))
    mixing *= np.logspace(0, -6, channels)[:, None]
    feeds = []
    for _ in range(count):
        coarse = rng.standard_normal((2, spatial // 5, spatial // 5, channels))
        z = coarse.repeat(5, axis=1).repeat(5, axis=2) + 0.01 * rng.standard_normal((2, spatial, spatial, channels))
        feeds.append({"x": np.ascontiguousarray((z @ mixing).transpose(0, 3, 1, 2)).astype(np.float32)})
    return feeds


def exposed(model, names):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return probe


def test_walk_sees_the_original_activations_and_carries_the_compressed_world(rng):
    model = residual_model(rng)
    feeds = anisotropic_feeds(rng, 2)
    layers = prepared(model).layers
    canonical = prepared(model).canonical
    seen, chains = {}, {}

    def visit(layer, xs, xts):
        seen[layer.name] = (xs, xts)
        chains[layer.name] = fit(layer, "svd", FixedRank(3)).chain
        return chains[layer.name]

    calibrate.walk_layers(canonical, layers, feeds, visit, sequential=True)
    reference = run(exposed(model, ["r0", "r1"]), feeds[1])
    np.testing.assert_allclose(seen["conv1"][0][1], reference[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["conv2"][0][1], reference[2], rtol=1e-5, atol=1e-6)
    # The compressed world: conv0 and conv1 replaced by their chains, read at conv2's input.
    workspace = prepared(model)
    for decision in workspace.decisions.values():
        if decision.layer.name in ("conv0", "conv1"):
            decision.chain, decision.status = chains[decision.layer.name], "rewritten"
    from onnx_lowrank.passes import rewritten_model
    compressed = rewritten_model(workspace)
    expected = run(exposed(compressed, ["r1"]), feeds[1])[1]
    np.testing.assert_allclose(seen["conv2"][1][1], expected, rtol=1e-4, atol=1e-5)
    assert relative_error(seen["conv2"][0][1], seen["conv2"][1][1]) > 1e-3


def output_error(tmp_path, model, calib, evaluation, **settings):
    source, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in calib]))
    api.compress(source, output, Settings(calib=str(tmp_path / "calib.npz"), calib_count=10_000, batch_size=2,
                                          validate=False, **settings))
    compressed = onnx.load(str(output))
    return np.mean([relative_error(run(model, f)[0], run(compressed, f)[0]) for f in evaluation])


@pytest.mark.parametrize("method", ["svd", "tucker2", "spatial-svd"])
def test_data_aware_beats_weight_only_on_anisotropic_inputs(tmp_path, rng, method):
    weight = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    model = conv_model((2, 16, 10, 10), weight, rng.standard_normal(16), pads=[1, 1, 1, 1])
    calib, evaluation = anisotropic_feeds(rng, 16), anisotropic_feeds(rng, 4)
    weight_only = output_error(tmp_path, model, calib, evaluation, method=method, rank=4, data_aware=False)
    data_aware = output_error(tmp_path, model, calib, evaluation, method=method, rank=4)
    assert data_aware * 2 < weight_only
    exact = output_error(tmp_path, model, calib, evaluation, method=method, rank_ratio=1.0)
    assert exact < 1e-5


def test_sequential_beats_independent_on_a_chain(tmp_path, rng):
    model = residual_model(rng)
    calib, evaluation = anisotropic_feeds(rng, 24), anisotropic_feeds(rng, 4)
    independent = output_error(tmp_path, model, calib, evaluation, method="svd", rank=3, sequential=False)
    sequential = output_error(tmp_path, model, calib, evaluation, method="svd", rank=3, sequential=True)
    assert sequential < independent


def test_bias_correction_and_refit_each_help(tmp_path, rng):
    model = residual_model(rng)
    calib, evaluation = anisotropic_feeds(rng, 16), anisotropic_feeds(rng, 4)
    common = dict(method="cp", rank=4, sequential=False)
    neither = output_error(tmp_path, model, calib, evaluation, refit=False, bias_correction=False, **common)
    both = output_error(tmp_path, model, calib, evaluation, **common)
    assert both < neither


def test_moments_do_not_grow_with_the_calibration_set(rng):
    small, large = Moments(), Moments()
    for count, moments in ((2, small), (40, large)):
        for _ in range(count):
            moments.add(rng.standard_normal((1, 64, 9)))
    assert small.xx.nbytes == large.xx.nbytes and large.n == 20 * small.n


def two_matmul_model(first, second, softmax=False, identity=False, opset=None):
    """x -> MatMul(first) -> h -> MatMul(second) -> y (-> Softmax -> p (-> Identity -> out))."""
    inits = [numpy_helper.from_array(first.astype(np.float32), "w0"),
             numpy_helper.from_array(second.astype(np.float32), "w1")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             helper.make_node("MatMul", ["h", "w1"], ["y"], name="mm1")]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["y"], ["p"], axis=-1 if opset is None or opset >= 13 else 1))
        if identity:
            nodes.append(helper.make_node("Identity", ["p"], ["out"]))
        return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, first.shape[0]])],
                          [helper.make_tensor_value_info("out" if identity else "p", TensorProto.FLOAT, None)],
                          inits, **({"opset": opset} if opset else {}))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, first.shape[0]])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def test_output_gains_measure_what_reaches_the_output(rng):
    # mm1 is the output layer: its relative error is the model's (gain 1). mm1 keeps only the
    # first half of h, where all of h's energy lives, so isotropic noise on h loses half its
    # energy on the way out: gain 1/2.
    width = 128
    first = np.zeros((32, width))
    first[:, :width // 2] = rng.standard_normal((32, width // 2))
    second = np.zeros((width, width))
    second[:width // 2, :width // 2] = np.linalg.qr(rng.standard_normal((width // 2, width // 2)))[0]
    model = two_matmul_model(first, second)
    feeds = [{"x": rng.standard_normal((64, 32)).astype(np.float32)} for _ in range(2)]
    workspace = prepared(model)
    gains = calibrate.output_gains(workspace.canonical, workspace.layers, feeds)
    assert gains["mm1"] == pytest.approx(1.0, rel=1e-4)
    assert gains["mm0"] == pytest.approx(0.5, rel=0.1)


def test_output_gains_look_through_a_saturated_softmax(rng):
    # Confident logits: small noise barely moves the softmax, but deep cuts would. The gain is
    # measured on the softmax's input, so the head keeps gain 1.
    first = rng.standard_normal((32, 64))
    second = 20 * rng.standard_normal((64, 10))
    model = two_matmul_model(first, second, softmax=True)
    feeds = [{"x": rng.standard_normal((64, 32)).astype(np.float32)}]
    workspace = prepared(model)
    gains = calibrate.output_gains(workspace.canonical, workspace.layers, feeds)
    assert gains["mm1"] == pytest.approx(1.0, rel=0.2)     # 1 but for the softmax's shift invariance


@pytest.mark.parametrize("opset", [11, 17])
def test_measured_outputs_look_through_identity_and_count_free_numbers(rng, opset):
    # PaddlePaddle exports end in Softmax -> Identity: the gains are measured on the logits, and
    # a two-class softmax leaves one free number per sample, so the gains use 64 samples.
    model = two_matmul_model(rng.standard_normal((32, 16)), rng.standard_normal((16, 2)),
                             softmax=True, identity=True, opset=opset)
    workspace = prepared(model)
    measured = calibrate.measured_outputs(workspace.canonical)
    assert list(measured) == ["y"]
    assert calibrate.output_freedom(workspace.canonical, workspace.shapes) == 1
    assert gain_samples(1) == MAX_GAIN_SAMPLES == 64
    plain = prepared(two_matmul_model(rng.standard_normal((32, 16)), rng.standard_normal((16, 10))))
    assert calibrate.measured_outputs(plain.canonical) == {"y": ()}
    assert calibrate.output_freedom(plain.canonical, plain.shapes) == 10
    assert calibrate.output_freedom(plain.canonical, {}) is None


def test_output_freedom_counts_the_least_telling_float_output(rng):
    # A two-class softmax beside a 10-wide float output and an int64 label: the label is never
    # compared, and the softmax's one free number per sample decides.
    inits = [numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "v")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"], name="head"),
             helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
             helper.make_node("ArgMax", ["p"], ["label"], axis=1),
             helper.make_node("MatMul", ["x", "v"], ["features"], name="side")]
    outputs = [helper.make_tensor_value_info("p", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("label", TensorProto.INT64, None),
               helper.make_tensor_value_info("features", TensorProto.FLOAT, None)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])], outputs, inits)
    workspace = prepared(model)
    assert calibrate.output_freedom(workspace.canonical, workspace.shapes) == 1
    assert calibrate.output_freedom(workspace.canonical, {**workspace.shapes, "features": ()}) == 1


@pytest.mark.parametrize("known", [True, False])
def test_output_gains_pass_perturbs_64_samples_of_a_two_class_head(rng, known):
    # Without the logits' shape (inference could not follow them) the pass infers it itself.
    model = two_matmul_model(rng.standard_normal((32, 16)), rng.standard_normal((16, 2)),
                             softmax=True, identity=True)
    workspace = prepared(model)
    if not known:
        workspace.shapes = {k: v for k, v in workspace.shapes.items() if k != "y"}
    feeds = [{"x": rng.standard_normal((16, 32)).astype(np.float32)} for _ in range(6)]
    workspace.calibration = feeds
    result = OutputGainsPass().run(workspace, lambda items, total, text: items)
    assert result.summary.endswith("on 64 samples")
    assert all(d.output_gain is not None for d in workspace.decisions.values() if d.reason is None)
    fewer = prepared(model)
    fewer.calibration = feeds[:2]
    few = OutputGainsPass().run(fewer, lambda items, total, text: items)
    assert few.summary.endswith("on 32 samples")


@pytest.mark.parametrize(("freedom", "samples"), [(None, 8), (0, 8), (1, 64), (3, 22), (10, 8), (10**6, 8)])
def test_gain_samples_grow_as_the_outputs_say_less_per_sample(freedom, samples):
    assert gain_samples(freedom) == samples


@pytest.mark.parametrize("opset", [11, 17])
def test_output_gains_ignore_what_a_softmax_ignores(rng, opset):
    # `shift` adds the same value to every logit of a row: the softmax does not see it.
    inits = [numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((8, 1)).astype(np.float32), "v")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"], name="head"),
             helper.make_node("MatMul", ["x", "v"], ["offset"], name="shift"),
             helper.make_node("Add", ["logits", "offset"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=1)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 8])],
                       [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)], inits, opset=opset)
    workspace = prepared(model)
    feeds = [{"x": rng.standard_normal((32, 8)).astype(np.float32)}]
    gains = calibrate.output_gains(workspace.canonical, workspace.layers, feeds)
    assert gains["shift"] < 1e-10 < gains["head"]


@pytest.mark.parametrize("quiet", [0.01, 0.0])
def test_budget_spends_its_cuts_where_the_model_output_feels_them_least(rng, tmp_path, quiet):
    # Two equal layers in parallel; one reaches the output scaled by `quiet` (1/100, or not at all:
    # gain 0). Alone, each layer's relative error curve is the same; weighted by its output gain,
    # the quiet branch is cut deeper.
    width = 64
    spectrum = np.logspace(0, -1.5, width)
    inits = []
    for name in ("wa", "wb"):
        u = np.linalg.qr(rng.standard_normal((width, width)))[0]
        v = np.linalg.qr(rng.standard_normal((width, width)))[0]
        inits.append(numpy_helper.from_array(((u * spectrum) @ v.T).astype(np.float32), name))
    inits.append(numpy_helper.from_array(np.array(quiet, dtype=np.float32), "quiet"))
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="loud"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="soft"),
             helper.make_node("Mul", ["b", "quiet"], ["bq"]),
             helper.make_node("Add", ["a", "bq"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, width])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    source = tmp_path / "parallel.onnx"
    onnx.save(model, source)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((64, width)).astype(np.float32))
    chosen = {}
    for weighted in (True, False):
        settings = Settings(method="svd", target_macs=0.5, rank_multiple=4, calib=str(calib), calib_count=64,
                            output_weighting=weighted, validate=False)
        result = api.compress(source, tmp_path / f"out_{weighted}.onnx", settings)
        chosen[weighted] = {layer.name: (layer.ranks[0] if layer.status == "rewritten" else width)
                            for layer in result.layers}
        if weighted:
            gains = {layer.name: layer.output_gain for layer in result.layers}
            assert gains["soft"] < 1e-2 * gains["loud"]
    assert chosen[True]["soft"] < chosen[True]["loud"]
    assert abs(chosen[False]["soft"] - chosen[False]["loud"]) < chosen[True]["loud"] - chosen[True]["soft"]


def test_vector_count_matches_the_vectors(rng):
    from conftest import gemm_model, matmul_model

    cases = [(conv_model((2, 4, 9, 7), rng.standard_normal((6, 2, 3, 2)), group=2, strides=[2, 1],
                         dilations=[1, 2], pads=[1, 0, 2, 1]), (2, 4, 9, 7)),
             (conv_model((2, 4, 9, 7), rng.standard_normal((6, 4, 3, 3)), auto_pad="SAME_UPPER", strides=[2, 2]),
              (2, 4, 9, 7)),
             (gemm_model((3, 5), rng.standard_normal((5, 4))), (3, 5)),
             (gemm_model((5, 3), rng.standard_normal((5, 4)), transA=1), (5, 3)),
             (matmul_model((2, 3, 5), rng.standard_normal((5, 4))), (2, 3, 5)),
             (matmul_model((2, 5, 3), rng.standard_normal((4, 5)), side="left"), (2, 5, 3))]
    for model, shape in cases:
        layer = prepared(model).layers[0]
        x = rng.standard_normal(shape).astype(np.float32)
        rows = sum(chunk.shape[1] for chunk in calibrate.layer_vectors(layer, x, 7))
        assert calibrate.vector_count(layer, x) == rows
        masks = []  # a chooser's rows are the same vectors as the whole chunks masked
        chosen = calibrate.layer_vectors(layer, x, 7, choose=lambda n, masks=masks: masks.append(rng.random(n) < 0.5)
                                         or masks[-1])
        chosen = np.concatenate(list(chosen), axis=1)
        every = np.concatenate(list(calibrate.layer_vectors(layer, x, 7)), axis=1)
        np.testing.assert_array_equal(chosen, every[:, np.concatenate(masks)])


def test_moments_of_a_subset_of_vectors_estimate_the_full_moments(rng):
    model = conv_model((4, 8, 32, 32), rng.standard_normal((8, 8, 3, 3)), pads=[1, 1, 1, 1])
    layer = prepared(model).layers[0]
    xs = [rng.standard_normal((4, 8, 32, 32)).astype(np.float32) for _ in range(2)]
    full = calibrate.layer_moments(layer, xs, None)
    sampled = calibrate.layer_moments(layer, xs, xs, rows=2048)
    assert full.n == 2 * 4 * 32 * 32 and 1500 < sampled.n < 2600
    np.testing.assert_allclose(sampled.xx[0] / sampled.n, full.xx[0] / full.n, atol=0.15)
    np.testing.assert_array_equal(sampled.tt, sampled.xx)     # the same positions of x and x~
