"""Label-free augmentation of image calibration inputs (`--augment`)."""

from __future__ import annotations

import numpy as np

from onnx_lowrank.augment import augmented


def test_copies_follow_the_batches_images_change_and_other_inputs_do_not(rng):
    images = rng.normal(size=(4, 3, 16, 16)).astype(np.float32)
    ids = np.arange(8, dtype=np.int64).reshape(4, 2)
    feeds = [{"image": images, "ids": ids}, {"image": images[:2], "ids": ids[:2]}]
    out = augmented(feeds, 2, seed=3)
    assert len(out) == 6 and out[:2] == feeds
    for copy, source in zip(out[2:], feeds * 2):
        assert copy["image"].shape == source["image"].shape and copy["image"].dtype == np.float32
        assert not np.allclose(copy["image"], source["image"])
        assert copy["ids"] is source["ids"]
    again = augmented(feeds, 2, seed=3)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(out, again))
    assert augmented(feeds, 0) is feeds


def test_a_flat_image_stays_flat_up_to_noise_and_nhwc_is_shifted_along_its_spatial_axes(rng):
    """A constant image is one the flips, shifts and contrast leave alone; only the noise moves it.
    A horizontal ramp in NHWC stays constant along its columns' channels (no channel mixing)."""
    flat = np.full((2, 3, 8, 8), 5.0, np.float32)
    out = augmented([{"x": flat}], 1, seed=0)[1]["x"]
    assert np.allclose(out, 5.0)            # std 0: the noise is 0 too
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[None, None, :, None], (2, 16, 16, 3)).copy()
    moved = augmented([{"x": ramp}], 1, seed=1)[1]["x"]
    assert np.allclose(moved[..., 0], moved[..., 1], atol=0.5) and np.allclose(moved[..., 0], moved[..., 2], atol=0.5)
