"""The zoo models (`models/zoo.toml`) as the full-rank checks see them: random feeds that the
models accept, the outputs a sigmoid ends, and graphs with extra outputs to compare."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_lowrank import inputs

#: Per model, inputs whose random values would be meaningless: a value broadcast to the input's shape.
FEED_OVERRIDES: dict[str, dict[str, object]] = {
    "silero-vad": {"sr": 16000},
    "silero-vad-op18-ifless": {"sr": 16000},
    "all-minilm-l6-v2": {"attention_mask": 1, "token_type_ids": 0},
}
#: Nodes that only move values around, looked through on the way from an output to its Sigmoid.
SHAPE_ONLY = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def zoo_feeds(name: str, model: onnx.ModelProto, shapes: list[str], count: int, seed: int = 0) -> list[dict]:
    """`count` random feeds (`onnx_lowrank.inputs.random_feeds` at the pinned `shapes`) with the
    zoo model's `FEED_OVERRIDES` applied."""
    specs = inputs.input_specs(model)
    resolved = inputs.resolve_shapes(specs, inputs.parse_input_shapes(shapes))
    feeds = inputs.random_feeds(specs, resolved, count=count, seed=seed)
    dtypes = {s.name: s.dtype for s in specs}
    for feed in feeds:
        for key, value in FEED_OVERRIDES.get(name, {}).items():
            if key in feed:
                feed[key] = np.full(feed[key].shape, value, dtype=dtypes[key])
    return feeds


def sigmoid_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """{graph output: input of the Sigmoid it is, through shape-only ops} for sigmoid-headed outputs.

    onnxruntime's Sigmoid is accurate to ~1e-7 ABSOLUTE: outputs near 0 (a detector's background
    on random input) carry a relative error of 1e-3 from a 1-ulp change in the input, whatever
    the rewrite. The pre-sigmoid tensor is the fair place to judge exactness.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for output in model.graph.output:
        node = producers.get(output.name)
        while node is not None and node.op_type in SHAPE_ONLY:
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "Sigmoid":
            found[output.name] = node.input[0]
    return found


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs the tensors `names` (types left to the runtime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in known)
    return out
