"""Pinned input values (`--input-value NAME:VALUE`): scalars such as a sample rate.

Some inputs are not data but switches: Silero VAD's `sr` (16000 or 8000) decides which branch
of an If runs. A random value would take a branch the model is never used with, and a
calibration file need not hold it. A pinned value is put into every feed the tool makes or
loads (calibration, guard, validation, latency, shape probes), broadcast to the feed's shape
for that input, and decides which If branches the cost totals count (`branches`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from onnx_lowrank.errors import InputError
from onnx_lowrank.inputs import InputSpec

__all__ = ["describe_values", "parse_input_values", "with_values", "without_pinned"]


def parse_input_values(items: Iterable[str] | None, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """``["sr:16000"]`` -> ``{"sr": array(16000, int64)}``, typed as the model's input.

    The name is everything before the LAST colon; the value is one number. The input must exist
    and hold numbers; the value must be representable in its type (an integer input takes no
    fraction).

    Raises:
        InputError: bad syntax, an unknown input, a non-numeric input or value, a name given twice.
    """
    by_name = {spec.name: spec for spec in specs}
    values: dict[str, np.ndarray] = {}
    for item in items or ():
        text = str(item).strip()
        name, sep, raw = text.rpartition(":")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise InputError(f"bad --input-value '{text}'; expected NAME:VALUE such as sr:16000")
        if name not in by_name:
            known = ", ".join(by_name) or "(none)"
            raise InputError(f"unknown input name '{name}' in --input-value; the model's inputs are: {known}")
        if name in values:
            raise InputError(f"--input-value gives input '{name}' twice")
        dtype = by_name[name].dtype
        if dtype.kind not in "biuf":
            raise InputError(f"--input-value '{text}': input '{name}' holds {dtype}, not numbers")
        try:
            number = float(raw)
        except ValueError:
            raise InputError(f"--input-value '{text}': '{raw}' is not a number") from None
        if dtype.kind in "biu" and not number.is_integer():
            raise InputError(f"--input-value '{text}': input '{name}' is {dtype}, which holds no fraction")
        values[name] = np.asarray(number).astype(dtype)
    return values


def without_pinned(specs: Sequence[InputSpec], values: Mapping[str, np.ndarray]) -> list[InputSpec]:
    """The inputs a feed source must still provide: those without a pinned value."""
    return [spec for spec in specs if spec.name not in values]


def with_values(feeds: Sequence[dict], values: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> list[dict]:
    """Each feed with the pinned inputs set to their values.

    A pinned input the feed lacks takes the input's declared shape with free dimensions set to
    the feed's batch size (a scalar stays a scalar); one it has keeps its shape, every element
    set to the value.
    """
    if not values:
        return list(feeds)
    shapes = {spec.name: spec.shape for spec in specs}
    filled = []
    for feed in feeds:
        batch = next((len(v) for v in feed.values() if np.ndim(v) >= 1), 1)
        feed = dict(feed)
        for name, value in values.items():
            shape = np.shape(feed[name]) if name in feed else tuple(
                d if isinstance(d, int) else batch for d in shapes[name])
            feed[name] = np.full(shape, value, dtype=value.dtype)
        filled.append(feed)
    return filled


def describe_values(values: Mapping[str, np.ndarray]) -> str:
    """``sr=16000, x=1`` for messages."""
    return ", ".join(f"{name}={value.item():g}" for name, value in values.items())
