"""Inputs from the user's own pipeline: a folder of ``.npy`` files, or ``module:function``.

`inputs.load_calibration` dispatches here for ``--calib`` / ``--eval`` values that are neither an
``.npz`` nor a folder of images:

* a folder of ``.npy`` files (sorted by name), for a model with one graph input: each file one
  sample of that input (the input's shape without the batch axis) or a stack of samples on axis 0;
* ``module:function`` or ``path/to/file.py:function``: a function taking no arguments and
  returning an iterable of feed dicts ``{input name: array with the batch axis}`` (the hook a data
  loader already has); its batches are used as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from onnx_lowrank.errors import InputError
from onnx_lowrank.plugins import load_callable

__all__ = ["feeds_from_function", "npy_folder_arrays"]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


def npy_folder_arrays(folder: Path, specs: Sequence, count: int | None) -> dict[str, np.ndarray]:
    """The samples of a folder of ``.npy`` files stacked on axis 0, for the model's single input."""
    if len(specs) != 1:
        raise InputError(f"a folder of .npy files feeds a model with one input; this one has {len(specs)} "
                         f"({', '.join(s.name for s in specs)}): use an .npz or module:function")
    spec = specs[0]
    samples = []
    for file in sorted(folder.glob("*.npy")):
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {file} as .npy: {exc}") from None
        if array.ndim == max(spec.rank - 1, 0):
            array = array[None]
        if array.ndim != max(spec.rank, 1):
            raise InputError(f"{file} has shape {array.shape}; expected one sample of input '{spec.name}' "
                             f"({spec.shape_str()} without its batch axis) or samples stacked on axis 0")
        samples.append(array)
        if count is not None and sum(len(s) for s in samples) >= count:
            break
    stacked = np.concatenate(samples)[:count]
    logger.info("calibration: %d samples from %d .npy files in %s", len(stacked), len(samples), folder)
    return {spec.name: stacked.astype(spec.dtype, copy=False)}


def feeds_from_function(spec_text: str, specs: Sequence, count: int | None) -> list[Feed]:
    """The feeds a user's function yields, checked against the graph inputs, cast to their dtypes,
    until `count` samples (a last batch cut to fit)."""
    function = load_callable(spec_text, "input", "f() -> iterable of {input name: array} feed dicts")
    try:
        produced = function()
        feeds: list[Feed] = []
        samples = 0
        for index, feed in enumerate(produced):
            feeds.append(_checked(feed, specs, spec_text, index))
            batch = len(next(iter(feeds[-1].values())))
            if count is not None and samples + batch >= count:
                feeds[-1] = {name: value[:count - samples] for name, value in feeds[-1].items()}
                break
            samples += batch
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's pipeline failing is the user's input
        raise InputError(f"the input function {spec_text} failed: {type(exc).__name__}: {exc}") from None
    if not feeds:
        raise InputError(f"the input function {spec_text} yielded no feeds")
    return feeds


def _checked(feed: object, specs: Sequence, source: str, index: int) -> Feed:
    if not isinstance(feed, Mapping):
        raise InputError(f"{source}: item {index} is a {type(feed).__name__}; expected a dict of input arrays")
    missing = [s.name for s in specs if s.name not in feed]
    if missing:
        raise InputError(f"{source}: item {index} has no array for input(s) {', '.join(missing)}; "
                         f"it has: {', '.join(map(str, feed)) or '(none)'}")
    return {s.name: np.asarray(feed[s.name]).astype(s.dtype, copy=False) for s in specs}
