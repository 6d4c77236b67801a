"""A folder of images as model input: decoding, resizing, cropping and normalisation.

Each image is read with pillow (an optional dependency: a clear error when it is missing),
in sorted file order, and preprocessed as `ImageOptions` says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_lowrank.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "ImageOptions", "image_batch"]

#: File suffixes (lower case) read as images from a calibration folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _dims_str(dims: Sequence) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes model input.

    Each image is converted to RGB (or to grayscale ``L`` when the model wants one channel),
    its short side resized to ``resize`` (bilinear), centre-cropped to the input's ``H x W``,
    and turned into ``x = (pixel * scale - mean[c]) / std[c]`` per channel ``c``.

    Attributes:
        resize: target of the short side before the crop; ``None`` means ``max(H, W)``, which
            keeps as much of the image as a centre crop can (use 256 for the usual ImageNet
            224 crop). The image is enlarged further if needed so the crop fits.
        mean: per-channel mean, in the MODEL's channel order (after ``channel_order``);
            one value broadcasts to every channel.
        std: per-channel standard deviation, same conventions, all non-zero.
        layout: ``"NCHW"``, ``"NHWC"`` or ``"auto"`` (NCHW when axis 1 has size 1 or 3, else
            NHWC when axis 3 does).
        channel_order: ``"RGB"`` or ``"BGR"`` (ignored for one channel).
        scale: multiplies the 0..255 pixel values first; the default maps them to [0, 1].
    """

    resize: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "auto"
    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        """Normalise the fields and check them."""
        object.__setattr__(self, "mean", tuple(float(m) for m in np.atleast_1d(self.mean)))
        object.__setattr__(self, "std", tuple(float(s) for s in np.atleast_1d(self.std)))
        object.__setattr__(self, "layout", str(self.layout).upper())
        object.__setattr__(self, "channel_order", str(self.channel_order).upper())
        if self.layout not in ("AUTO", "NCHW", "NHWC"):
            raise InputError(f"image layout must be auto, NCHW or NHWC, found '{self.layout}'")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(
                f"image channel order must be RGB or BGR, found '{self.channel_order}'"
            )
        if self.resize is not None and int(self.resize) <= 0:
            raise InputError(f"image resize must be a positive size, found {self.resize}")
        if any(s == 0 or not math.isfinite(s) for s in self.std):
            raise InputError(f"image std must be finite and non-zero, found {self.std}")


def _image_layout(name: str, dims: Sequence, options: ImageOptions) -> str:
    if options.layout != "AUTO":
        return options.layout
    if dims[1] in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3):
        return "NHWC"
    raise InputError(
        f"cannot tell the image layout of input '{name}' (shape {_dims_str(dims)}): "
        "neither axis 1 nor axis 3 has 1 or 3 channels; set the layout to NCHW or NHWC"
    )


def image_batch(folder: Path, name: str, dims: Sequence, dtype: np.dtype, count: int | None,
                options: ImageOptions) -> np.ndarray:
    """The images of `folder` (sorted by name, at most `count`) as one array for the 4-D input
    `name` of shape `dims`, preprocessed by `options`, samples on axis 0."""
    layout = _image_layout(name, dims, options)
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels, height, width = dims[c_axis], dims[h_axis], dims[w_axis]
    if channels is None or isinstance(channels, str):
        channels = 3
    if channels not in (1, 3):
        raise InputError(
            f"input '{name}' ({_dims_str(dims)}, {layout}) has {channels} channels; "
            "images give 1 (grayscale) or 3 (colour)"
        )
    if not isinstance(height, int) or not isinstance(width, int):
        example = "x".join(
            str(d) if isinstance(d, int) else ("1" if i == 0 else "224") for i, d in enumerate(dims)
        )
        raise InputError(
            f"input '{name}' has a dynamic image size ({_dims_str(dims)}); pin it with "
            f"--input-shape {name}:{example}"
        )
    for what, values in (("mean", options.mean), ("std", options.std)):
        if len(values) not in (1, channels):
            raise InputError(
                f"image {what} has {len(values)} values; expected 1 or {channels} for input "
                f"'{name}' with {channels} channel(s)"
            )

    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in calibration folder {folder}")
    if count is not None:
        files = files[:count]
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading an image folder needs pillow: pip install pillow") from None

    resize = int(options.resize) if options.resize is not None else max(height, width)
    mean = np.asarray(options.mean, dtype=np.float32)
    std = np.asarray(options.std, dtype=np.float32)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                pixels = _resize_crop(image, resize, height, width)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"cannot read image {file}: {exc}") from None
        hwc = np.asarray(pixels, dtype=np.float32).reshape(height, width, channels)
        if channels == 3 and options.channel_order == "BGR":
            hwc = hwc[..., ::-1]
        hwc = (hwc * np.float32(options.scale) - mean) / std
        images.append(hwc.transpose(2, 0, 1) if layout == "NCHW" else hwc)
    return np.stack(images).astype(dtype)


def _resize_crop(image, resize: int, height: int, width: int):
    """Resize the short side to ``resize`` (at least enough to cover HxW), centre-crop HxW."""
    from PIL import Image

    w, h = image.size
    scale = max(resize / min(w, h), width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))
