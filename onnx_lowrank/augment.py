"""Label-free augmentation of image calibration inputs (`--augment N`).

Each calibration batch is followed by `N` transformed copies of itself. An input counts as an
image when it is a float array of rank 4 (NCHW, or NHWC when its last axis has 1-4 channels and
its second more); other inputs (token ids, masks, states) are repeated unchanged, so the feeds
stay consistent. Per copy and sample, with a seeded generator:

- a horizontal flip with probability 1/2;
- a translation by up to `SHIFT` of the height and width, the uncovered border filled by
  reflecting the image (a crop of a slightly larger view);
- a contrast change about the sample's mean by a factor in ``[1 - CONTRAST, 1 + CONTRAST]``;
- Gaussian noise of `NOISE` times the sample's standard deviation.

The statistics then see more positions, mirror images and textures of the same scenes; whether
that narrows the gap between calibration and held-out inputs is measured in the README.
"""

from __future__ import annotations

import numpy as np

__all__ = ["augmented"]

SHIFT = 0.125
CONTRAST = 0.1
NOISE = 0.02


def augmented(feeds: list[dict[str, np.ndarray]], copies: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`feeds` followed, batch by batch, by `copies` augmented versions of each batch."""
    if copies <= 0:
        return feeds
    rng = np.random.default_rng(seed)
    out = list(feeds)
    for _ in range(copies):
        for feed in feeds:
            out.append({name: _transformed(value, rng) if _is_image(value) else value
                        for name, value in feed.items()})
    return out


def _is_image(value) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 4 and np.issubdtype(value.dtype, np.floating)


def _spatial_axes(value: np.ndarray) -> tuple[int, int]:
    """(height axis, width axis): NHWC when the last axis looks like colour channels, else NCHW."""
    return (1, 2) if value.shape[3] <= 4 < value.shape[1] else (2, 3)


def _transformed(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rows, cols = _spatial_axes(batch)
    out = np.empty_like(batch)
    for index, sample in enumerate(batch):
        image = sample
        if rng.random() < 0.5:
            image = np.flip(image, axis=cols - 1)
        dy = int(rng.integers(-int(SHIFT * image.shape[rows - 1]), int(SHIFT * image.shape[rows - 1]) + 1))
        dx = int(rng.integers(-int(SHIFT * image.shape[cols - 1]), int(SHIFT * image.shape[cols - 1]) + 1))
        image = _shifted(image, dy, rows - 1)
        image = _shifted(image, dx, cols - 1)
        mean, spread = float(image.mean()), float(image.std())
        image = mean + (image - mean) * rng.uniform(1 - CONTRAST, 1 + CONTRAST)
        out[index] = image + rng.normal(scale=NOISE * spread, size=image.shape)
    return out


def _shifted(image: np.ndarray, offset: int, axis: int) -> np.ndarray:
    """`image` moved by `offset` along `axis`, the border filled by reflection."""
    if offset == 0:
        return image
    size = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (abs(offset), abs(offset))
    padded = np.pad(image, pad, mode="reflect")
    start = abs(offset) - offset
    return np.take(padded, np.arange(start, start + size), axis=axis)
