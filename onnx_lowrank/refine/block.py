"""A block of ONNX nodes run forward and backward in numpy, with some of its constants trainable.

`Block.from_model` takes a (sub-)model: its nodes in topological order, its initializers as
constants, its graph inputs and outputs. `forward` runs it on input arrays and records what the
backward pass needs (`ops.OPS`); `backward` takes the gradients of the outputs and returns the
gradients of the constants named `trainable`, by reverse-mode accumulation through the nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank.refine import ops

__all__ = ["Block"]


def _attributes(node: onnx.NodeProto) -> dict:
    values = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return values


@dataclasses.dataclass
class Block:
    """Nodes (op, inputs, outputs, attributes) over named constants, from `inputs` to `outputs`."""

    nodes: list[tuple[str, list[str], list[str], dict]]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> Block:
        graph = model.graph
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes = [(n.op_type, list(n.input), list(n.output), _attributes(n)) for n in graph.node]
        return cls(nodes, constants, [i.name for i in graph.input if i.name not in constants],
                   [o.name for o in graph.output])

    def unsupported(self) -> str | None:
        """Why the block cannot be refined (the first node that cannot run here), or None."""
        for op, inputs, _, attrs in self.nodes:
            reason = ops.unsupported(op, attrs, inputs)
            if reason is not None:
                return reason
        return None

    def forward(self, feeds: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray] | None = None,
                tape: list | None = None) -> dict[str, np.ndarray]:
        """The block's outputs for `feeds`, with `params` in place of the constants of the same
        names; with a `tape` (a list), what `backward` needs is appended to it."""
        values = {**self.constants, **(params or {}), **feeds}
        for op, inputs, outputs, attrs in self.nodes:
            forward, _ = ops.OPS[op]
            results, saved = forward([values.get(name) if name else None for name in inputs], attrs)
            values.update(zip(outputs, results, strict=False))
            if tape is not None:
                tape.append((op, inputs, outputs, saved))
        return {name: values[name] for name in self.outputs}

    def backward(self, tape: list, output_grads: Mapping[str, np.ndarray], trainable: Iterable[str]
                 ) -> dict[str, np.ndarray]:
        """Gradients of the `trainable` constants, given the gradients of the outputs."""
        grads = dict(output_grads)
        wanted = set(trainable)
        needed = self._needs_gradient(wanted)
        for op, inputs, outputs, saved in reversed(tape):
            upstream = [grads.pop(name, None) for name in outputs]
            if upstream[0] is None or not any(name in needed for name in inputs):
                continue
            _, backward = ops.OPS[op]
            for name, grad in zip(inputs, backward(saved, upstream), strict=False):
                if grad is not None and name in needed:
                    grads[name] = grads[name] + grad if name in grads else grad
        return {name: grads[name] for name in wanted if name in grads}

    def _needs_gradient(self, trainable: set[str]) -> set[str]:
        """Tensors whose gradient is needed: the trainable constants and everything computed from them."""
        needed = set(trainable)
        for _, inputs, outputs, _ in self.nodes:
            if any(name in needed for name in inputs):
                needed.update(outputs)
        return needed
