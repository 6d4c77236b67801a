"""Multiply-accumulate and parameter counts of Conv, ConvTranspose, Gemm and MatMul nodes.

Formulas (rewrites.md, "Costs"), with shapes as ONNX lays them out:

- Conv, weight `[T, S/g, k1..kN]`, output `[B, T, o1..oN]`: `B·T·Πo·(S/g)·Πk`
  = `prod(output) · prod(weight[1:])`;
- ConvTranspose, weight `[S, T/g, k1..kN]`, input `[B, S, i1..iN]`: every input pixel scatters one
  kernel, `B·S·Πi·(T/g)·Πk` = `prod(input) · prod(weight[1:])`;
- Gemm and MatMul, output `[..., M, N]` with inner dimension K: `prod(output) · K`
  (broadcast batch dimensions included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["COSTED_OPS", "conv_output_shape", "node_macs"]

COSTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def node_macs(op: str, input_shape: Sequence[int], output_shape: Sequence[int],
              weight_shape: Sequence[int], inner: int | None = None) -> int:
    """MACs of one node of type `op` with concrete shapes.

    `weight_shape` is the Conv/ConvTranspose kernel shape; for Gemm/MatMul pass `inner`, the
    contracted dimension K (the weight shape alone does not say which side is contracted).
    """
    if op == "Conv":
        return math.prod(output_shape) * math.prod(weight_shape[1:])
    if op == "ConvTranspose":
        return math.prod(input_shape) * math.prod(weight_shape[1:])
    if op in ("Gemm", "MatMul"):
        if inner is None:
            raise ValueError(f"{op}: the inner dimension K is needed to count MACs")
        return math.prod(output_shape) * inner
    raise ValueError(f"no cost formula for {op}; expected one of {', '.join(COSTED_OPS)}")


def conv_output_shape(input_shape: Sequence[int], weight_shape: Sequence[int],
                      strides: Sequence[int], dilations: Sequence[int],
                      pads: Sequence[int]) -> tuple[int, ...]:
    """Output shape of a Conv with explicit pads `(b1..bN, e1..eN)`.

    `o_d = floor((i_d + b_d + e_d - δ_d·(k_d - 1) - 1) / s_d) + 1` (ONNX Conv, auto_pad NOTSET).
    """
    n = len(weight_shape) - 2
    spatial = tuple(
        (input_shape[2 + d] + pads[d] + pads[n + d] - dilations[d] * (weight_shape[2 + d] - 1) - 1)
        // strides[d] + 1
        for d in range(n))
    return (input_shape[0], weight_shape[0], *spatial)
