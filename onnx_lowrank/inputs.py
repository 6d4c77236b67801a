"""Feeds for a model: graph input specs, pinned shapes, random feeds and calibration data.

A *feed* is one ``dict[str, np.ndarray]`` keyed by graph input name, ready for
``InferenceSession.run``. Everything here is deterministic: random feeds come from an explicit
seed, files are read in sorted order.

Calibration data (``--calib PATH``) is either

* an ``.npz`` with one array per graph input, samples stacked on axis 0: the model's input of
  shape ``(B, d1, ..., dk)`` is fed ``array[i*B:(i+1)*B]``, so each array must have shape
  ``(N, d1, ..., dk)`` (dynamic ``d`` are free), or
* a folder of images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``) for a model with one 4-D image
  input, preprocessed as described by `ImageOptions`, or
* a folder of ``.npy`` files, or ``module:function`` returning feed dicts (`sources`).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.errors import InputError
from onnx_lowrank.images import ImageOptions, image_batch
from onnx_lowrank.plugins import is_callable_spec
from onnx_lowrank.sources import feeds_from_function, npy_folder_arrays

__all__ = [
    "RANDOM_COUNT",
    "InputSpec",
    "input_specs",
    "load_calibration",
    "parse_input_shapes",
    "random_feeds",
    "resolve_shapes",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Dim = int | str | None

#: Random inputs made when no input file is given (compress and validate alike).
RANDOM_COUNT = 16
#: Random integer feeds are drawn uniformly from ``[0, RANDOM_INT_HIGH)``: 0 and 1 are valid
#: indices for every embedding (a BERT's token-type table has two rows) and valid masks.
RANDOM_INT_HIGH = 2


@dataclass(frozen=True)
class InputSpec:
    """One real graph input.

    Attributes:
        name: the graph input name.
        dtype: the element type as a numpy dtype (``object`` for strings).
        shape: one entry per axis: an ``int`` for a fixed size, a ``str`` for a named dynamic
            dimension (``dim_param``), ``None`` for an unnamed dynamic one.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        """Number of axes."""
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        """True when every dimension is a fixed ``int``."""
        return all(isinstance(d, int) for d in self.shape)

    def shape_str(self) -> str:
        """The shape written as ``1x3xHxW`` (``?`` for an unnamed dynamic dimension)."""
        return _dims_str(self.shape)


def _dims_str(dims: Sequence[Dim]) -> str:
    if not dims:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in dims)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real graph inputs, in graph order.

    Inputs that are also initializers are weights (old exporters list them as inputs with
    default values) and are excluded.

    Args:
        model: the model; external data need not be loaded.

    Returns:
        One `InputSpec` per real input.

    Raises:
        InputError: an input is not a tensor (sequence, map, optional).
    """
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            kind = value.type.WhichOneof("value") or "unknown"
            raise InputError(
                f"graph input '{value.name}' is a {kind} value; expected a tensor input"
            )
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims: list[Dim] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    return specs


def parse_input_shapes(items: Iterable[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape`` values ``NAME:D1xD2x...`` into ``{NAME: (D1, D2, ...)}``.

    The name is everything before the LAST colon (so TensorFlow-style names such as
    ``input:0`` work); dimensions are positive integers separated by ``x`` (or ``,``).

    Raises:
        InputError: bad syntax, a non-positive dimension, or a name given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        text = str(item).strip()
        name, sep, dims_text = text.rpartition(":")
        name = name.strip()
        if not sep or not name or not dims_text.strip():
            raise InputError(
                f"bad --input-shape '{text}'; expected NAME:DIMS such as input:1x3x224x224"
            )
        parts = dims_text.lower().replace(",", "x").split("x")
        try:
            dims = tuple(int(p.strip()) for p in parts)
        except ValueError:
            raise InputError(
                f"bad --input-shape '{text}'; expected positive integers separated by 'x' "
                f"such as {name}:1x3x224x224, found '{dims_text}'"
            ) from None
        if any(d <= 0 for d in dims):
            raise InputError(
                f"bad --input-shape '{text}'; dimensions must be positive, found '{dims_text}'"
            )
        if name in shapes:
            raise InputError(f"--input-shape gives input '{name}' twice")
        shapes[name] = dims
    return shapes


def _check_pinned(
    specs: Sequence[InputSpec], pinned: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """Check pinned shapes against the specs: known names, same rank, fixed dims agree."""
    by_name = {s.name: s for s in specs}
    checked: dict[str, tuple[int, ...]] = {}
    for name, dims in (pinned or {}).items():
        if name not in by_name:
            known = ", ".join(s.name for s in specs) or "(none)"
            raise InputError(
                f"unknown input name '{name}' in --input-shape; the model's inputs are: {known}"
            )
        spec = by_name[name]
        dims = tuple(int(d) for d in dims)
        if len(dims) != spec.rank:
            raise InputError(
                f"--input-shape for '{name}' gives {len(dims)} dims ({_dims_str(dims)}) but the "
                f"input has rank {spec.rank} ({spec.shape_str()})"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, dims, strict=True)):
            if isinstance(want, int) and want != got:
                raise InputError(
                    f"--input-shape for '{name}' gives {_dims_str(dims)} but the model fixes "
                    f"dimension {axis} to {want} ({spec.shape_str()})"
                )
        checked[name] = dims
    return checked


def resolve_shapes(
    specs: Sequence[InputSpec], pinned: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every input.

    Pinned shapes win; in the rest a dynamic first (batch) dimension becomes 1.

    Args:
        specs: from `input_specs`.
        pinned: ``{name: dims}`` from `parse_input_shapes`.

    Returns:
        ``{name: shape}`` for every spec.

    Raises:
        InputError: an unknown pinned name, a pinned rank or fixed dimension that disagrees
            with the model, or a dynamic dimension other than the first that is not pinned.
    """
    checked = _check_pinned(specs, pinned)
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in checked:
            shapes[spec.name] = checked[spec.name]
            continue
        dims = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(1)
            else:
                label = f"'{dim}'" if dim else "unnamed"
                example = "x".join(
                    str(d) if isinstance(d, int) else ("1" if i == 0 else "N")
                    for i, d in enumerate(spec.shape)
                )
                raise InputError(
                    f"input '{spec.name}' has a dynamic dimension {axis} ({label}, shape "
                    f"{spec.shape_str()}); pin it with --input-shape {spec.name}:{example}"
                )
        shapes[spec.name] = tuple(dims)
    return shapes


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    kind = spec.dtype.kind
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        return rng.integers(0, RANDOM_INT_HIGH, size=shape).astype(spec.dtype)
    if kind in "fc" or spec.dtype.name == "bfloat16" or kind == "V":
        return np.asarray(rng.standard_normal(shape)).astype(spec.dtype)
    raise InputError(
        f"input '{spec.name}' has dtype {spec.dtype}; random feeds cannot be made for it, "
        "give calibration data with --calib"
    )


def random_feeds(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]],
    count: int,
    seed: int = 0,
) -> list[Feed]:
    """``count`` random feeds, the same for the same seed.

    Floats are standard normal ``N(0, 1)``; integers uniform in ``[0, 100)``; booleans fair
    coin flips. One ``numpy.random.default_rng(seed)`` draws every sample in order
    (sample by sample, input by input).

    Args:
        specs: from `input_specs`.
        shapes: concrete shape per input (from `resolve_shapes`).
        count: number of feeds (model runs).
        seed: the random seed.

    Raises:
        InputError: ``count`` < 1, a missing shape, or an input type that has no random
            generator (strings).
    """
    if count < 1:
        raise InputError(f"the number of random inputs must be at least 1, found {count}")
    missing = [s.name for s in specs if s.name not in shapes]
    if missing:
        raise InputError(f"no concrete shape for input(s) {', '.join(missing)}")
    rng = np.random.default_rng(seed)
    return [
        {s.name: _random_array(rng, s, tuple(int(d) for d in shapes[s.name])) for s in specs}
        for _ in range(count)
    ]


def _batch_size_for(
    spec: InputSpec, pinned: Mapping[str, tuple[int, ...]], batch_size: int | None
) -> int:
    """Batch size of one input: the argument, else the pinned or declared first dim, else 1."""
    declared = spec.shape[0]
    if batch_size is not None:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, found {batch_size}")
        fixed = pinned[spec.name][0] if spec.name in pinned else declared
        if isinstance(fixed, int) and fixed != batch_size:
            raise InputError(
                f"batch size {batch_size} was requested but input '{spec.name}' has batch "
                f"dimension {fixed}"
            )
        return batch_size
    if spec.name in pinned:
        return pinned[spec.name][0]
    if isinstance(declared, int):
        return declared
    return 1


def _common_batch(
    specs: Sequence[InputSpec], pinned: Mapping[str, tuple[int, ...]], batch_size: int | None
) -> tuple[int, bool]:
    """The batch size every batched input agrees on, and whether partial batches may run."""
    batched = [s for s in specs if s.rank >= 1]
    sizes = {s.name: _batch_size_for(s, pinned, batch_size) for s in batched}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}: {b}" for n, b in sizes.items())
        raise InputError(
            f"the inputs disagree on the batch size ({listing}); pin them with --input-shape"
        )
    size = next(iter(sizes.values()), 1)
    # A last, smaller batch may run only where the model leaves the batch dimension free.
    flexible = all(not isinstance(s.shape[0], int) and s.name not in pinned for s in batched)
    return size, flexible


def _split_batches(
    arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], batch: int, flexible: bool
) -> list[Feed]:
    """Cut ``(N, ...)`` arrays into feeds of ``batch`` samples."""
    n = len(next(iter(arrays.values())))
    full, rest = divmod(n, batch)
    if full == 0 and not flexible:
        raise InputError(
            f"the calibration data has {n} sample(s) but the model's batch size is {batch}"
        )
    stops = [(i * batch, (i + 1) * batch) for i in range(full)]
    if rest:
        if flexible:
            stops.append((full * batch, n))
        else:
            logger.warning(
                "dropping the last %d calibration sample(s): they do not fill a batch of %d",
                rest,
                batch,
            )
    feeds = []
    for start, stop in stops:
        feed = {}
        for spec in specs:
            arr = arrays[spec.name]
            feed[spec.name] = np.ascontiguousarray(
                arr[start] if spec.rank == 0 else arr[start:stop]
            )
        feeds.append(feed)
    return feeds


def load_calibration(
    path: str | os.PathLike,
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    count: int | None = None,
    batch_size: int | None = None,
    image_options: ImageOptions | None = None,
) -> list[Feed]:
    """Feeds from an ``.npz`` file, a folder of images or ``.npy`` files, or ``module:function``.

    Samples are cut into batches of the batch size: ``batch_size`` if given, else the first
    dimension pinned in ``shapes``, else the model's fixed batch dimension, else 1. With a
    fixed batch dimension a last incomplete batch is dropped (logged); with a free one it
    runs as a smaller batch.

    Args:
        path: an ``.npz`` (one array per graph input, samples stacked on axis 0; other keys
            are ignored and logged; each array is cast to its input's dtype), a folder of
            images for a single 4-D image input (see `ImageOptions`), a folder of ``.npy`` files
            or ``module:function`` returning feed dicts (see `sources`).
        specs: from `input_specs`.
        shapes: pinned shapes (``--input-shape``); partial is fine.
        count: keep at most this many samples (before batching).
        batch_size: samples per feed.
        image_options: preprocessing for an image folder (defaults: `ImageOptions()`).

    Returns:
        A non-empty list of feeds.

    Raises:
        InputError: a missing path, an unreadable or corrupt file, a missing graph input, a
            shape that does not fit the model, an empty folder, or no pillow for images.
    """
    if count is not None and count < 1:
        raise InputError(f"the calibration sample count must be at least 1, found {count}")
    if is_callable_spec(str(path)) and not Path(path).exists():
        return feeds_from_function(str(path), specs, count)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (the calibration data)")
    pinned = _check_pinned(specs, shapes)
    if path.is_dir() and any(path.glob("*.npy")):
        batch, flexible = _common_batch(specs, pinned, batch_size)
        return _split_batches(npy_folder_arrays(path, specs, count), specs, batch, flexible)
    if path.is_dir():
        return _load_image_folder(path, specs, pinned, count, batch_size, image_options)
    if path.suffix.lower() != ".npz":
        raise InputError(
            f"calibration data must be an .npz file or a folder of images, found '{path}'"
        )
    return _load_npz(path, specs, pinned, count, batch_size)


def _load_npz(
    path: Path,
    specs: Sequence[InputSpec],
    pinned: Mapping[str, tuple[int, ...]],
    count: int | None,
    batch_size: int | None,
) -> list[Feed]:
    # Open the file here: np.load leaks its own handle when the zip directory is corrupt.
    with open(path, "rb") as handle:
        try:
            archive = np.load(handle, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"cannot read calibration file {path} as .npz: {exc}") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InputError(
                f"calibration file {path} holds a single array; expected an .npz with one "
                "array per graph input (np.savez(path, NAME=array, ...))"
            )
        with archive:
            arrays = _read_npz_arrays(path, archive, specs, pinned)
    counts = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise InputError(
            f"calibration file {path} has different sample counts per input ({listing}); "
            "expected the same number on axis 0"
        )
    if not arrays:
        raise InputError("the model has no inputs to calibrate")
    n = next(iter(counts.values()))
    if n == 0:
        raise InputError(f"calibration file {path} has no samples (axis 0 is empty)")
    if count is not None:
        arrays = {k: a[:count] for k, a in arrays.items()}
    batch, flexible = _common_batch(specs, pinned, batch_size)
    feeds = _split_batches(arrays, specs, batch, flexible)
    logger.info("calibration: %d feed(s) of batch %d from %s", len(feeds), batch, path)
    return feeds


def _read_npz_arrays(
    path: Path,
    archive: np.lib.npyio.NpzFile,
    specs: Sequence[InputSpec],
    pinned: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """One checked array per graph input; other keys are logged and ignored."""
    keys = list(archive.files)
    names = {s.name for s in specs}
    extra = [k for k in keys if k not in names]
    if extra:
        logger.info("ignoring calibration arrays that are not graph inputs: %s", ", ".join(extra))
    missing = [s.name for s in specs if s.name not in keys]
    if missing:
        raise InputError(
            f"calibration file {path} has no array for graph input(s) {', '.join(missing)}; "
            f"it has: {', '.join(keys) or '(none)'}"
        )
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            arr = np.asarray(archive[spec.name])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise InputError(
                f"cannot read array '{spec.name}' from calibration file {path}: {exc}"
            ) from None
        arrays[spec.name] = _check_npz_array(path, spec, arr, pinned)
    return arrays


def _check_npz_array(
    path: Path, spec: InputSpec, arr: np.ndarray, pinned: Mapping[str, tuple[int, ...]]
) -> np.ndarray:
    """Check an ``(N, d1..dk)`` array against the input ``(B, d1..dk)``; cast its dtype."""
    want = pinned.get(spec.name, spec.shape)
    want_rank = max(spec.rank, 1)
    if arr.ndim != want_rank:
        raise InputError(
            f"calibration array '{spec.name}' in {path} has shape {arr.shape}; expected "
            f"{want_rank} axes: samples on axis 0, then the input's shape {_dims_str(want)} "
            "without its batch dimension"
        )
    for axis in range(1, spec.rank):
        dim = want[axis]
        if isinstance(dim, int) and arr.shape[axis] != dim:
            raise InputError(
                f"calibration array '{spec.name}' in {path} has shape {arr.shape}; axis {axis} "
                f"should be {dim} to fit the input's shape {_dims_str(want)}"
            )
    if arr.dtype != spec.dtype:
        if arr.dtype.kind != spec.dtype.kind:
            logger.warning(
                "casting calibration array '%s' from %s to the input's dtype %s",
                spec.name,
                arr.dtype,
                spec.dtype,
            )
        try:
            arr = arr.astype(spec.dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"calibration array '{spec.name}' has dtype {arr.dtype} which cannot be cast "
                f"to the input's dtype {spec.dtype}: {exc}"
            ) from None
    return arr


def _load_image_folder(
    folder: Path,
    specs: Sequence[InputSpec],
    pinned: Mapping[str, tuple[int, ...]],
    count: int | None,
    batch_size: int | None,
    options: ImageOptions | None,
) -> list[Feed]:
    if len(specs) != 1 or specs[0].rank != 4:
        found = ", ".join(f"{s.name} ({s.shape_str()})" for s in specs) or "(none)"
        raise InputError(
            f"a folder of images needs a model with exactly one 4-D image input; found: {found}"
        )
    spec = specs[0]
    stacked = image_batch(folder, spec.name, pinned.get(spec.name, spec.shape), spec.dtype, count,
                          options or ImageOptions())
    batch, flexible = _common_batch(specs, pinned, batch_size)
    feeds = _split_batches({spec.name: stacked}, specs, batch, flexible)
    logger.info("calibration: %d image(s) from %s as %d feed(s) of batch %d", len(stacked), folder, len(feeds), batch)
    return feeds
