"""What the passes measure on the ORIGINAL model and its inputs, kept for the next run over them.

A `SharedStatistics` is a store the point-independent passes read before they compute and fill
after: `LoadInputsPass` (the calibration, guard and evaluation feeds), `DataSpectraPass` (each
candidate layer's output-error spectra, from one calibration walk) and `OutputGainsPass` (each
layer's output gain). Every `compress` run has one: a fresh, private store unless the caller
gives one (`default_pipeline(settings, shared)`), so a run with a shared store takes the same
path as one without and computes only what the store lacks. `onnx_lowrank.sweep` gives every
point of a model one store, filled once.

Entries are keyed by what they depend on, so a store given to runs with other settings or another
model is never read wrongly: feeds by their source and the settings that load them; spectra per
layer by the layer's name and a digest of its weight (after folding) plus the settings that change
the statistics (`statistics_key`); gains by the same for the whole candidate set (each layer's
noise is drawn from one seeded generator in candidate order, so a gain depends on the set) and
the noise they perturb with (`Settings.gain_noise`).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from onnx_lowrank.graph import Layer

__all__ = ["SharedStatistics", "inputs_key", "layer_key", "statistics_key"]


def inputs_key(settings, path: str | None, count: int | None) -> tuple:
    """What decides the feeds loaded from `path` (`count` of them): the source, the batching, the
    pinned shapes and values, the image preprocessing and (for random inputs) the seed."""
    images = (settings.resize, tuple(settings.mean), tuple(settings.std), settings.layout, settings.channel_order)
    pins = tuple(settings.input_shape), tuple(settings.input_value)
    return path, count, settings.batch_size, pins, images, settings.seed


def statistics_key(settings) -> tuple:
    """The settings a layer's data spectra and gains depend on besides its weight: the calibration
    inputs (`inputs_key`) and their augmented copies (`--augment`), the memory budget (dense or
    sample-space moments) and the tile grid (tiled-svd's spectra)."""
    return (inputs_key(settings, settings.calib, settings.calib_count), settings.augment, settings.max_memory,
            tuple(settings.tiles))


def layer_key(layer: Layer) -> tuple[str, str]:
    """The layer's name and a digest of its weight and bias, as the canonical model holds them."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (layer.weight, layer.bias):
        if array is not None:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
    return layer.name, digest.hexdigest()


@dataclasses.dataclass
class SharedStatistics:
    """A store of point-independent measurements of one original model (see the module docstring).

    Attributes:
        method_names: methods whose spectra a calibration walk measures on top of those its own
            run asks for, so that one walk serves runs with other methods (a sweep over
            `auto,tucker2,svd` measures all of them at the first walk).
        feeds: loaded inputs by `inputs_key`.
        spectra: ``{(statistics_key, layer_key): {method name: spectra}}``.
        gains: ``{(statistics_key, gain noise, candidate layer keys): ({layer name: gain}, samples
            perturbed)}``.
        walks: calibration walks over the original model made to fill the store.
        gain_runs: output-gain measurements made to fill it.
        seconds: wall time the walks and gain measurements took.
    """

    method_names: tuple[str, ...] = ()
    feeds: dict[tuple, list[dict]] = dataclasses.field(default_factory=dict)
    spectra: dict[tuple, dict[str, tuple]] = dataclasses.field(default_factory=dict)
    gains: dict[tuple, tuple[dict[str, float], int]] = dataclasses.field(default_factory=dict)
    walks: int = 0
    gain_runs: int = 0
    seconds: float = 0.0
