"""Models written piece by piece: the exact bytes, and external data without touching the model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model
from onnx_lowrank import model as model_io
from onnx_lowrank import runtime, serialize
from onnx_lowrank.runtime import runtime_max_ir_version


def test_saved_bytes_are_the_serialized_model_written_piece_by_piece(tmp_path, rng):
    """`save_model` never copies or serialises the whole model at once, and writes exactly the
    bytes `SerializeToString` gives: nodes, initializers, a subgraph, functions, metadata."""
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "then", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = conv_model((1, 3, 8, 8), rng.standard_normal((4, 3, 3, 3)), doc_string="a conv")
    model.graph.node.append(helper.make_node("If", ["flag"], ["w"], then_branch=then, else_branch=then))
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    model.graph.doc_string = "graph doc"
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(108).astype(np.float32), "V"))
    model.functions.append(helper.make_function("custom", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                [helper.make_opsetid("", 13)]))
    helper.set_model_props(model, {"author": "test"})
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    expected.ir_version = 7
    pieces = list(serialize.serialized_pieces(model, 7))
    assert b"".join(pieces) == expected.SerializeToString()
    assert max(map(len, pieces)) < model.ByteSize() / 2
    path = model_io.save_model(model, tmp_path / "m.onnx")
    assert onnx.load(str(path)).ir_version == min(model.ir_version, runtime_max_ir_version())


def _nested_model(rng) -> onnx.ModelProto:
    """y = x @ W, and an If whose branches each hold a large Constant and a small one: tensors at
    three depths, two of them under the external-data threshold."""
    def branch(name: str, value: np.ndarray) -> onnx.GraphProto:
        nodes = [helper.make_node("Constant", [], [f"{name}_big"], value=numpy_helper.from_array(value, f"{name}_c")),
                 helper.make_node("Constant", [], [f"{name}_one"], value=numpy_helper.from_array(
                     np.ones(4, np.float32), f"{name}_small")),
                 helper.make_node("ReduceSum", [f"{name}_one"], [f"{name}_s"], keepdims=0),
                 helper.make_node("Mul", [f"{name}_big", f"{name}_s"], [f"{name}_z"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_z", TensorProto.FLOAT, [256])])

    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("If", ["flag"], ["z"], then_branch=branch("then", rng.standard_normal(256).astype(np.float32)),
                              else_branch=branch("else", rng.standard_normal(256).astype(np.float32)))]
    graph = helper.make_graph(
        nodes, "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [256])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(3, np.float32), "unused_small")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _outputs(source, flag: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    x = np.arange(64, dtype=np.float32).reshape(1, 64) / 64
    return session.run(None, {"x": x, "flag": np.array(flag)})


def test_external_data_write_leaves_the_model_as_it_is(tmp_path, rng):
    model = _nested_model(rng)
    before = model.SerializeToString()
    data = serialize.save_with_external_data(model, tmp_path / "m.onnx", 8)
    assert model.SerializeToString() == before
    # W (16 KiB) and both branches' 1 KiB constants move; the 12- and 16-byte tensors stay inline.
    assert data.stat().st_size == 64 * 64 * 4 + 2 * 256 * 4
    written = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = [t.name for t in serialize.all_tensors(written.graph) if t.data_location == TensorProto.EXTERNAL]
    assert sorted(external) == ["W", "else_c", "then_c"]
    assert (tmp_path / "m.onnx").stat().st_size < 1024
    for flag in (True, False):
        for got, want in zip(_outputs(str(tmp_path / "m.onnx"), flag), _outputs(before, flag)):
            np.testing.assert_array_equal(got, want)
    loaded = model_io.load_model(tmp_path / "m.onnx")
    for got, want in zip(serialize.all_tensors(loaded.graph), serialize.all_tensors(model.graph)):
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))


def test_large_models_are_saved_and_run_without_changing_them(tmp_path, rng, monkeypatch):
    """Past the protobuf limit (lowered here) a model is saved, and run by onnxruntime, through
    external data; the model in memory keeps its weights (onnx.save would move them out)."""
    model = _nested_model(rng)
    before = model.SerializeToString()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(runtime, "_PROTO_LIMIT", 1000)
    path = model_io.save_model(model, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    session = runtime.make_session(model, "cpu", produced=True)
    assert model.SerializeToString() == before
    x = np.arange(64, dtype=np.float32).reshape(1, 64) / 64
    for flag in (True, False):
        want = _outputs(before, flag)
        for got in (_outputs(str(path), flag), session.run(None, {"x": x, "flag": np.array(flag)})):
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threshold", [1, 4096, 10**9])
def test_every_tensor_at_or_over_the_threshold_moves_and_no_other(tmp_path, rng, threshold):
    model = _nested_model(rng)
    serialize.save_with_external_data(model, tmp_path / "m.onnx", 8, threshold=threshold)
    written = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for got, want in zip(serialize.all_tensors(written.graph), serialize.all_tensors(model.graph)):
        moved = got.data_location == TensorProto.EXTERNAL
        assert moved == (len(want.raw_data) >= threshold), want.name


def test_all_tensors_include_an_attributes_tensor_list(rng):
    listed = [numpy_helper.from_array(rng.standard_normal(300).astype(np.float32), f"t{i}") for i in range(2)]
    node = helper.make_node("Custom", ["x"], ["y"], domain="custom", values=listed)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert [t.name for t in serialize.all_tensors(graph)] == ["t0", "t1"]
