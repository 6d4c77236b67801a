"""Layer weights read from the model on demand, the most recently used kept within a byte budget.

A `Layer` found in a model reads its weight from the model's initializer (`graph.Layer.weight`)
instead of holding a copy: the model already holds every weight once, and a second copy per
layer doubled the memory of a large model for the whole run. Reading a tensor costs one copy of
its bytes, so the arrays read last stay cached up to `CACHE_BYTES` (the whole model when it is
smaller than that: then nothing is ever read twice).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["CACHE_BYTES", "WeightCache", "cached_weight"]

#: Bytes of weight arrays kept between reads.
CACHE_BYTES = 256 << 20


class WeightCache:
    """Read-only arrays of initializers, least recently used dropped past `budget` bytes (the
    array read last always stays)."""

    def __init__(self, budget: int = CACHE_BYTES):
        self.budget = budget
        self._arrays: OrderedDict[int, tuple[onnx.TensorProto, np.ndarray]] = OrderedDict()
        self._bytes = 0

    def get(self, tensor: onnx.TensorProto) -> np.ndarray:
        """`numpy_helper.to_array(tensor)`, read-only, from the cache when read before."""
        key = id(tensor)
        held = self._arrays.get(key)
        if held is not None and held[0] is tensor:
            self._arrays.move_to_end(key)
            return held[1]
        array = numpy_helper.to_array(tensor)
        array.flags.writeable = False
        if held is not None:
            self._bytes -= held[1].nbytes
        self._arrays[key] = (tensor, array)
        self._bytes += array.nbytes
        while self._bytes > self.budget and len(self._arrays) > 1:
            _, (_, dropped) = self._arrays.popitem(last=False)
            self._bytes -= dropped.nbytes
        return array


_CACHE = WeightCache()


def cached_weight(tensor: onnx.TensorProto) -> np.ndarray:
    """The initializer's array through the process's weight cache."""
    return _CACHE.get(tensor)
