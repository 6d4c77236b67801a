"""Data-aware factorization: im2col, streaming moments, whitened SVDs, data Tucker-2 and refits.

The data are synthetic with a strongly anisotropic input covariance (channels mixed as
``z * diag(logspace(0, -3)) * R``, spatially smoothed), where fitting the OUTPUT must beat
fitting the weights. Output errors are measured directly on held-out patches (never on the
calibration patches the fits saw, unless stated).
"""

from __future__ import annotations

import dataclasses
import math
import string

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from onnx_lowrank.factorize import (
    channel_svd,
    compose_chain,
    cp,
    cp_depthwise,
    spatial_svd,
    tiled_svd,
    tucker2,
)
from onnx_lowrank.factorize.linalg import regression_target, regularized, whitened_svd
from onnx_lowrank.factorize.moments import Moments, SampleMoments, conv_moments
from onnx_lowrank.factorize.patches import im2col, iter_patches, same_pads
from onnx_lowrank.factorize.refit import bias_shift, refit_chain, refit_last, refit_matrix
from onnx_lowrank.factorize.whiten import (
    DataTuckerFactors,
    data_tucker2,
    shrinkage,
    whitened_channel_svd,
    whitened_rows,
    whitened_spatial_svd,
    whitened_tiled_svd,
)
from onnx_lowrank.factorize.svd import SVDFactors, TiledSVDFactors
from onnx_lowrank.factorize.tucker import TuckerFactors

EXACT = 1e-6  # relative output-error energy allowed at full rank


# ----------------------------------------------------------------------------- helpers


def direct_conv(x, weight, strides, dilations, pads, groups):
    """ONNX Conv (no bias) by explicit loops over the kernel taps, float64."""
    n = x.ndim - 2
    padded = np.pad(x, [(0, 0), (0, 0), *zip(pads[:n], pads[n:])])
    kernel = weight.shape[2:]
    out = [(padded.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(n)]
    batch, channels = x.shape[:2]
    t = weight.shape[0]
    t_g, s_g = t // groups, channels // groups
    y = np.zeros((batch, t, *out))
    for tap in np.ndindex(*kernel):
        window = tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
            for i in range(n)
        )
        xs = padded[(slice(None), slice(None), *window)]
        for g in range(groups):
            w = weight[(slice(g * t_g, (g + 1) * t_g), slice(None), *tap)]
            y[:, g * t_g : (g + 1) * t_g] += np.einsum("ts,bs...->bt...", w, xs[:, g * s_g : (g + 1) * s_g])
    return y


def valid_conv(x, weight, group):
    """Grouped N-D cross-correlation, valid padding, stride 1 (as in test_factorize)."""
    batch = x.shape[0]
    out_channels, in_per_group, *kernel = weight.shape
    n = len(kernel)
    windows = sliding_window_view(x, kernel, axis=tuple(range(2, 2 + n)))
    windows = windows.reshape(batch, group, in_per_group, *windows.shape[2:])
    grouped = weight.reshape(group, out_channels // group, in_per_group, *kernel)
    out_axes, k_axes = string.ascii_lowercase[:n], string.ascii_lowercase[n : 2 * n]
    y = np.einsum(f"BGC{out_axes}{k_axes},GOC{k_axes}->BGO{out_axes}", windows, grouped)
    return y.reshape(batch, out_channels, *y.shape[3:])


def run_chain(x, stages, groups_per_stage, shuffle=None):
    """The chain's stages as Convs; ``shuffle = (a, b, r)`` reshuffles after stage 1 like the rewrite."""
    y = x
    for index, (weight, group) in enumerate(zip(stages, groups_per_stage, strict=True)):
        y = valid_conv(y, np.asarray(weight, np.float64), group)
        if index == 0 and shuffle is not None:
            rows, cols, rank = shuffle
            shape = y.shape
            y = y.reshape(shape[0], cols, rows, rank, -1).transpose(0, 2, 1, 3, 4).reshape(shape)
    return y


def images(rng, batch, channels, spatial, decay=3.0, mean=0.0):
    """Images with strongly correlated channels: std logspace(0, -decay) then a rotation fixed per
    channel count (calibration and held-out images share the distribution), spatially smoothed."""
    z = rng.standard_normal((batch, channels, *[d + 2 for d in spatial]))
    for axis in range(2, z.ndim):
        size = z.shape[axis] - 2
        z = sum(np.take(z, np.arange(shift, shift + size), axis=axis) for shift in range(3)) / 3.0
    rotation = np.linalg.qr(np.random.default_rng(1000 + channels).standard_normal((channels, channels)))[0]
    mix = np.logspace(0, -decay, channels)[:, None] * rotation
    return np.einsum("bd...,dc->bc...", z, mix) + mean


def lowered(kernel, groups):
    return kernel.reshape(groups, kernel.shape[0] // groups, -1)


def output_error(kernel, approx, groups, patches, patches_tilde=None, bias=None):
    """``E||W p - W' p~ - c||^2 / E||W p||^2`` on explicit patches (an energy ratio)."""
    patches_tilde = patches if patches_tilde is None else patches_tilde
    y = np.einsum("gtd,gnd->gnt", lowered(kernel, groups), patches)
    y_hat = np.einsum("gtd,gnd->gnt", lowered(approx, groups), patches_tilde)
    if bias is not None:
        y_hat = y_hat + bias.reshape(groups, 1, -1)
    return float(np.sum((y - y_hat) ** 2) / np.sum(y**2))


def refit_factors(factors, kernel, moments, **switches):
    """`refit_chain` on a factorization result: its stages with the last one refit, and the bias delta."""
    new_last, delta = refit_chain(factors.stages, factors.groups_per_stage, factors.groups_per_stage[-1],
                                  factors.groups, moments, kernel, factors._input_orders(), **switches)
    return dataclasses.replace(factors, stages=(*factors.stages[:-1], new_last.astype(np.float64))), delta


def moments_of(patches, patches_tilde=None, chunk=500):
    moments = Moments()
    for start in range(0, patches.shape[1], chunk):
        part = slice(start, start + chunk)
        moments.add(patches[:, part], None if patches_tilde is None else patches_tilde[:, part])
    return moments


@pytest.fixture
def setting():
    """A 3x3 conv with 8 -> 16 channels, calibration and held-out patches of correlated images."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((16, 8, 3, 3))
    calib = im2col(images(rng, 8, 8, (14, 14)), (3, 3))
    held_out = im2col(images(rng, 8, 8, (14, 14)), (3, 3))
    return kernel, calib, held_out


# ----------------------------------------------------------------------------- im2col


def test_im2col_matches_a_direct_convolution():
    rng = np.random.default_rng(1)
    for case in range(40):
        n = (1, 2, 3)[case % 3]
        groups = int(rng.integers(1, 4))
        s_g, t_g = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        kernel = [int(rng.integers(1, 4 if n == 3 else 5)) for _ in range(n)]
        strides = [int(rng.integers(1, 4)) for _ in range(n)]
        dilations = [int(rng.integers(1, 3)) for _ in range(n)]
        pads = [int(rng.integers(0, 3)) for _ in range(2 * n)]
        spatial = [int(rng.integers((k - 1) * d + 1, (k - 1) * d + 7)) for k, d in zip(kernel, dilations)]
        x = rng.standard_normal((2, groups * s_g, *spatial))
        weight = rng.standard_normal((groups * t_g, s_g, *kernel))
        expected = direct_conv(x, weight, strides, dilations, pads, groups)
        patches = im2col(x, kernel, strides, dilations, pads, groups)
        assert patches.shape == (groups, 2 * math.prod(expected.shape[2:]), s_g * math.prod(kernel))
        y = np.einsum("gtd,gnd->gnt", lowered(weight, groups), patches)
        y = y.reshape(groups, 2, *expected.shape[2:], t_g)
        y = np.moveaxis(y, -1, 2).swapaxes(0, 1).reshape(expected.shape)
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        for max_rows in (1, 3, 7, 1000):
            chunks = list(iter_patches(x, kernel, strides, dilations, pads, groups, max_rows=max_rows))
            assert all(chunk.shape[1] <= max_rows for chunk in chunks)
            np.testing.assert_array_equal(np.concatenate(chunks, axis=1), patches)
        (whole,) = iter_patches(x, kernel, strides, dilations, pads, groups, max_rows=None)
        np.testing.assert_array_equal(whole, patches)
        masks = []  # a chooser forms only the rows it keeps: the same patches as masking them all
        chosen = iter_patches(x, kernel, strides, dilations, pads, groups, max_rows=5,
                              choose=lambda rows: masks.append(rng.random(rows) < 0.4) or masks[-1])
        np.testing.assert_array_equal(np.concatenate(list(chosen), axis=1), patches[:, np.concatenate(masks)])


def test_im2col_keeps_float32_and_defaults_are_a_valid_unit_stride_conv():
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 6)).astype(np.float32)
    patches = im2col(x, (3, 3), groups=2)
    assert patches.dtype == np.float32 and patches.shape == (2, 3 * 4, 2 * 9)
    np.testing.assert_array_equal(patches[1, 0].reshape(2, 3, 3), x[0, 2:4, 0:3, 0:3])


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "upper", "lower"),
    [
        (7, 3, 2, 1, (1, 1), (1, 1)),
        (6, 3, 2, 1, (0, 1), (1, 0)),
        (5, 3, 1, 2, (2, 2), (2, 2)),
        (8, 1, 3, 1, (0, 0), (0, 0)),
        (4, 4, 1, 1, (1, 2), (2, 1)),
    ],
)
def test_same_pads_follow_the_onnx_rule(size, kernel, stride, dilation, upper, lower):
    got_upper = same_pads([size], [kernel], [stride], [dilation], "SAME_UPPER")
    got_lower = same_pads([size], [kernel], [stride], [dilation], "SAME_LOWER")
    assert got_upper == upper and got_lower == lower
    x = np.zeros((1, 1, size))
    assert im2col(x, [kernel], [stride], [dilation], got_upper).shape[1] == -(-size // stride)
    assert same_pads([size, 3], [kernel, 3], mode="VALID") == (0, 0, 0, 0)


# ----------------------------------------------------------------------------- moments


def test_streaming_moments_equal_the_full_computation():
    rng = np.random.default_rng(3)
    p = rng.standard_normal((3, 1000, 7)) + rng.standard_normal((3, 1, 7))
    t = p + 0.3 * rng.standard_normal(p.shape)
    streamed = moments_of(p, t, chunk=97)
    assert streamed.n == 1000 and streamed.paired and (streamed.groups, streamed.dim) == (3, 7)
    np.testing.assert_allclose(streamed.mean_x, p.mean(axis=1))
    np.testing.assert_allclose(streamed.mean_t, t.mean(axis=1))
    np.testing.assert_allclose(streamed.cov_xx, np.einsum("gnd,gne->gde", p, p) / 1000)
    np.testing.assert_allclose(streamed.cov_tt, np.einsum("gnd,gne->gde", t, t) / 1000)
    np.testing.assert_allclose(streamed.cov_xt, np.einsum("gnd,gne->gde", p, t) / 1000)

    unpaired = moments_of(p, chunk=300)
    assert not unpaired.paired and unpaired.tt is None
    np.testing.assert_array_equal(unpaired.cov_tt, unpaired.cov_xx)
    np.testing.assert_array_equal(unpaired.cov_xt, unpaired.cov_xx)
    np.testing.assert_array_equal(unpaired.mean_t, unpaired.mean_x)

    # A chunk without p~ counts as p~ = p, before or after paired chunks.
    mixed = Moments()
    mixed.add(p[:, :400])
    mixed.add(p[:, 400:], t[:, 400:])
    t_mixed = np.concatenate([p[:, :400], t[:, 400:]], axis=1)
    np.testing.assert_allclose(mixed.cov_xt, np.einsum("gnd,gne->gde", p, t_mixed) / 1000)

    # Matrices: rows [n, K] are one group; conv_moments streams iter_patches.
    rows = Moments()
    rows.add(p[0])
    np.testing.assert_allclose(rows.cov_xx[0], p[0].T @ p[0] / 1000)
    x = rng.standard_normal((2, 4, 9, 9))
    x_t = x + 0.1
    from_conv = conv_moments(x, (3, 3), strides=(2, 1), groups=2, x_tilde=x_t, max_rows=5)
    full = im2col(x, (3, 3), (2, 1), groups=2)
    np.testing.assert_allclose(from_conv.cov_xt, np.einsum("gnd,gne->gde", full, full + 0.1) / full.shape[1])


def test_moments_reject_mismatched_chunks():
    moments = Moments()
    moments.add(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="does not match"):
        moments.add(np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        moments.add(np.full((2, 5, 3), np.nan))
    with pytest.raises(ValueError, match="no patches"):
        _ = Moments().cov_xx


def test_regularized_is_relative_to_the_mean_variance():
    sigma = np.diag([4.0, 0.0, 2.0])
    np.testing.assert_allclose(regularized(sigma, 0.1), np.diag([4.2, 0.2, 2.2]))
    np.testing.assert_allclose(regularized(np.zeros((2, 2)), 0.1), 0.1 * np.eye(2))
    np.linalg.cholesky(regularized(np.ones((5, 5))))  # rank 1 becomes positive definite


# ----------------------------------------------------------------------------- whitened SVD


def test_whitened_svd_minimises_the_output_error():
    rng = np.random.default_rng(4)
    d, m = 12, 9
    basis = rng.standard_normal((d, d)) * np.logspace(0, -2, d)
    sigma = basis @ basis.T
    W = rng.standard_normal((m, d))
    A, B, values = whitened_svd(W, sigma, 3)
    assert A.shape == (m, 3) and B.shape == (3, d)
    assert values.shape == (min(m, d),) and np.all(np.diff(values) <= 1e-12)
    reg = regularized(sigma)
    error = np.trace((W - A @ B) @ reg @ (W - A @ B).T)
    assert error == pytest.approx(np.sum(values[3:] ** 2), rel=1e-8)
    # Better than the weight-only truncation and than any random rank-3 map in this metric.
    U, s, Vt = np.linalg.svd(W)
    weight_only = (U[:, :3] * s[:3]) @ Vt[:3]
    assert error < np.trace((W - weight_only) @ reg @ (W - weight_only).T)
    # Deterministic signs; full rank is exact.
    assert np.all(A[np.argmax(np.abs(A), axis=0), np.arange(3)] > 0)
    A_full, B_full, _ = whitened_svd(W, sigma, m)
    np.testing.assert_allclose(A_full @ B_full, W, atol=1e-9)


def test_whitened_channel_svd_beats_weight_only_on_the_output(setting):
    kernel, calib, held_out = setting
    moments = moments_of(calib)
    weight_only = channel_svd(kernel, 4)
    whitened = whitened_channel_svd(kernel, 1, 4, moments)
    assert isinstance(whitened, SVDFactors) and whitened.method == "svd"
    assert [w.shape for w in whitened.weights] == [w.shape for w in weight_only.weights]
    assert whitened.groups_per_stage == (1, 1) and whitened.ranks == (4,)
    err_weight = output_error(kernel, weight_only.to_tensor(), 1, held_out)
    err_white = output_error(kernel, whitened.to_tensor(), 1, held_out)
    assert err_white < 0.5 * err_weight, (err_white, err_weight)
    # The weight error is worse (it is what weight-only minimises) and is reported against the kernel.
    assert whitened.rel_error > weight_only.rel_error
    # The whitened spectrum predicts the calibration output error.
    values = whitened.singular_values[0]
    predicted = np.sum(values[4:] ** 2) / np.sum(values**2)
    assert output_error(kernel, whitened.to_tensor(), 1, calib) == pytest.approx(predicted, rel=1e-3)
    full = whitened_channel_svd(kernel, 1, 16, moments)
    assert output_error(kernel, full.to_tensor(), 1, held_out) < EXACT


def test_grouped_whitened_channel_svd_is_per_group():
    rng = np.random.default_rng(5)
    kernel = rng.standard_normal((12, 4, 3, 3))
    x = images(rng, 6, 8, (10, 10))
    moments = conv_moments(x, (3, 3), groups=2)
    result = whitened_channel_svd(kernel, 2, 3, moments)
    assert [w.shape for w in result.weights] == [(6, 4, 3, 3), (12, 3, 1, 1)] and result.groups_per_stage == (2, 2)
    for g in range(2):
        one = Moments()
        one.add(im2col(x[:, 4 * g : 4 * g + 4], (3, 3)))
        alone = whitened_channel_svd(kernel[6 * g : 6 * g + 6], 1, 3, one)
        np.testing.assert_allclose(result.stages[0][3 * g : 3 * g + 3], alone.stages[0], atol=1e-9)
        np.testing.assert_allclose(result.stages[1][6 * g : 6 * g + 6], alone.stages[1], atol=1e-9)
    held_out = im2col(images(rng, 6, 8, (10, 10)), (3, 3), groups=2)
    assert output_error(kernel, whitened_channel_svd(kernel, 2, 6, moments).to_tensor(), 2, held_out) < EXACT
    assert output_error(kernel, result.to_tensor(), 2, held_out) < 0.5 * output_error(
        kernel, channel_svd(kernel, 3, groups=2).to_tensor(), 2, held_out
    )


def test_whitened_spatial_and_tiled_svd_beat_weight_only(setting):
    kernel, calib, held_out = setting
    moments = moments_of(calib)
    spatial = whitened_spatial_svd(kernel, 1, 6, moments)
    reference = spatial_svd(kernel, 6)
    assert spatial.method == "spatial-svd"
    assert [w.shape for w in spatial.weights] == [w.shape for w in reference.weights]
    assert output_error(kernel, spatial.to_tensor(), 1, held_out) < 0.5 * output_error(
        kernel, reference.to_tensor(), 1, held_out
    )
    assert output_error(kernel, whitened_spatial_svd(kernel, 1, 24, moments).to_tensor(), 1, held_out) < EXACT

    tiled = whitened_tiled_svd(kernel, (2, 2), 3, moments)
    reference = tiled_svd(kernel, (2, 2), 3)
    assert isinstance(tiled, TiledSVDFactors) and tiled.needs_shuffle
    assert [w.shape for w in tiled.weights] == [w.shape for w in reference.weights]
    assert tiled.groups_per_stage == reference.groups_per_stage
    assert output_error(kernel, tiled.to_tensor(), 1, held_out) < 0.5 * output_error(
        kernel, reference.to_tensor(), 1, held_out
    )
    assert output_error(kernel, whitened_tiled_svd(kernel, (2, 2), 8, moments).to_tensor(), 1, held_out) < EXACT


def test_data_tucker2_beats_weight_only_tucker2(setting):
    kernel, calib, held_out = setting
    moments = moments_of(calib)
    fitted = data_tucker2(kernel, 1, (6, 3), moments)
    reference = tucker2(kernel, (6, 3))
    assert isinstance(fitted, DataTuckerFactors) and isinstance(fitted, TuckerFactors)
    assert fitted.method == "tucker2" and fitted.ranks == (6, 3) and math.isnan(fitted.error_bound)
    assert [w.shape for w in fitted.weights] == [w.shape for w in reference.weights]
    assert fitted.groups_per_stage == reference.groups_per_stage
    err_data = output_error(kernel, fitted.to_tensor(), 1, held_out)
    err_weight = output_error(kernel, reference.to_tensor(), 1, held_out)
    assert err_data < 0.5 * err_weight, (err_data, err_weight)
    assert output_error(kernel, data_tucker2(kernel, 1, (16, 8), moments).to_tensor(), 1, held_out) < EXACT
    # Tucker-1 variants have tucker2's layouts.
    for ranks, method in (((None, 3), "tucker1-in"), ((6, None), "tucker1-out")):
        one = data_tucker2(kernel, 1, ranks, moments)
        assert one.method == method
        assert [w.shape for w in one.weights] == [w.shape for w in tucker2(kernel, ranks).weights]
        assert output_error(kernel, one.to_tensor(), 1, held_out) < output_error(
            kernel, tucker2(kernel, ranks).to_tensor(), 1, held_out
        )


# ----------------------------------------------------------------------------- sequential


def test_regression_target_beats_the_original_weight_on_the_compressed_input(setting):
    kernel, calib, held_out = setting
    rng = np.random.default_rng(6)
    d = calib.shape[2]
    distortion = 0.3 * rng.standard_normal((d, d)) / math.sqrt(d)

    def compressed(p):  # p~ = p + structured noise correlated with p, plus a little white noise
        return p + p @ distortion + 0.01 * rng.standard_normal(p.shape)

    calib_t, held_t = compressed(calib), compressed(held_out)
    paired = moments_of(calib, calib_t)
    W = kernel.reshape(16, -1)
    target = regression_target(W, paired.cov_xt[0], paired.cov_tt[0])
    err_target = output_error(W, target, 1, held_out, held_t)
    err_plain = output_error(W, W, 1, held_out, held_t)
    assert err_target < 0.1 * err_plain, (err_target, err_plain)
    same = moments_of(calib)  # p~ = p: W* = W on the data (up to the relative ridge)
    assert output_error(W, regression_target(W, same.cov_xt[0], same.cov_tt[0]), 1, held_out) < 1e-5
    for moments, fitted in ((same, W), (paired, target)):
        A, B, _ = whitened_rows(W, moments, 3)
        A_ref, B_ref, _ = whitened_svd(fitted, moments.cov_tt[0], 3)
        np.testing.assert_allclose(A @ B, A_ref @ B_ref, atol=1e-9 * np.abs(A_ref @ B_ref).max())
    # Both factors refitted: reduced-rank regression beats whitening p~ alone.
    sequential = whitened_channel_svd(kernel, 1, 6, paired)
    independent = whitened_channel_svd(kernel, 1, 6, moments_of(calib_t))
    err_seq = output_error(kernel, sequential.to_tensor(), 1, held_out, held_t)
    err_ind = output_error(kernel, independent.to_tensor(), 1, held_out, held_t)
    assert err_seq < 0.7 * err_ind, (err_seq, err_ind)
    fitted = data_tucker2(kernel, 1, (8, 4), paired)
    assert output_error(kernel, fitted.to_tensor(), 1, held_out, held_t) < output_error(
        kernel, data_tucker2(kernel, 1, (8, 4), moments_of(calib_t)).to_tensor(), 1, held_out, held_t
    )


# ----------------------------------------------------------------------------- refits


def test_refit_last_is_the_ridge_least_squares_solution():
    rng = np.random.default_rng(7)
    p = rng.standard_normal((400, 10)) * np.logspace(0, -1, 10)
    t = p + 0.2 * rng.standard_normal(p.shape)
    W, H = rng.standard_normal((5, 10)), rng.standard_normal((3, 10))
    moments = moments_of(p[None], t[None])
    ridge = 1e-2
    A = refit_last(W, H, moments.cov_xt[0], moments.cov_tt[0], ridge)
    z = t @ H.T
    lam = ridge * np.trace(z.T @ z / 400) / 3
    augmented = np.vstack([z, math.sqrt(400 * lam) * np.eye(3)])
    rhs = np.vstack([p @ W.T, np.zeros((3, 5))])
    np.testing.assert_allclose(A, np.linalg.lstsq(augmented, rhs, rcond=None)[0].T, atol=1e-10)
    shift = bias_shift(W, A, H, moments.mean_x[0], moments.mean_t[0])
    np.testing.assert_allclose(shift, (p @ W.T - t @ H.T @ A.T).mean(axis=0), atol=1e-12)


def test_bias_shift_removes_a_planted_mean_shift(setting):
    kernel, calib, _ = setting
    rng = np.random.default_rng(8)
    offset = rng.standard_normal(calib.shape[2])
    calib_t = calib + offset  # the compressed model's input is off by a constant: so is the output
    paired = moments_of(calib, calib_t)
    exact = channel_svd(kernel, 16)
    A = exact.stages[1].reshape(16, 16)
    H = exact.stages[0].reshape(16, -1)
    W = kernel.reshape(16, -1)
    shift = bias_shift(W, A, H, paired.mean_x[0], paired.mean_t[0])
    np.testing.assert_allclose(shift, -W @ offset, atol=1e-9)
    assert output_error(kernel, exact.to_tensor(), 1, calib, calib_t) > 0.1
    assert output_error(kernel, exact.to_tensor(), 1, calib, calib_t, bias=shift) < 1e-12
    # The refit of a truncated chain leaves no mean error on the calibration data.
    truncated = channel_svd(kernel, 4)
    refitted, delta = refit_factors(truncated, kernel, paired)
    approx = refitted.to_tensor().reshape(16, -1)
    residual = np.einsum("td,nd->nt", W, calib[0]) - np.einsum("td,nd->nt", approx, calib_t[0]) - delta
    assert np.abs(residual.mean(axis=0)).max() < 1e-9 * np.abs(residual).max()
    no_bias, zero = refit_factors(truncated, kernel, paired, with_bias=False)
    assert not zero.any()
    # Bias correction alone (refit=False): the weights stay, the delta is bias_shift with them.
    kept, only_delta = refit_factors(truncated, kernel, paired, refit=False)
    assert all(np.array_equal(a, b) for a, b in zip(kept.stages, truncated.stages, strict=True))
    np.testing.assert_allclose(only_delta, bias_shift(
        W, truncated.stages[1].reshape(16, 4), truncated.stages[0].reshape(4, -1), paired.mean_x[0], paired.mean_t[0]))
    assert output_error(kernel, kept.to_tensor(), 1, calib, calib_t, bias=only_delta) < output_error(
        kernel, kept.to_tensor(), 1, calib, calib_t
    )
    assert output_error(kernel, refitted.to_tensor(), 1, calib, calib_t, bias=delta) < output_error(
        kernel, no_bias.to_tensor(), 1, calib, calib_t
    )


def test_refit_lowers_the_held_out_output_error(setting):
    kernel, calib, held_out = setting
    moments = moments_of(calib)
    weight_only = (
        channel_svd(kernel, 4), tucker2(kernel, (6, 3)), tiled_svd(kernel, (2, 2), 3), spatial_svd(kernel, 6)
    )
    for factors in weight_only:
        refitted, delta = refit_factors(factors, kernel, moments)
        before = output_error(kernel, factors.to_tensor(), 1, held_out)
        after = output_error(kernel, refitted.to_tensor(), 1, held_out, bias=delta)
        assert after < 0.7 * before, (factors.method, after, before)
    # Matrices: x @ W ~ (x @ P) @ Q with P from the weight-only SVD.
    rng = np.random.default_rng(9)
    rotation = np.linalg.qr(rng.standard_normal((24, 24)))[0]
    x_calib, x_held = (rng.standard_normal((2000, 24)) * np.logspace(0, -3, 24) @ rotation + 0.5 for _ in range(2))
    W = rng.standard_normal((24, 10))
    P = np.linalg.svd(W)[0][:, :4] * np.linalg.svd(W)[1][:4]
    Q0 = np.linalg.svd(W)[2][:4]
    rows = Moments()
    rows.add(x_calib)
    Q, delta = refit_matrix(W, P, rows)
    assert Q.shape == (4, 10) and delta.shape == (10,)
    y = x_held @ W
    before = np.sum((y - x_held @ P @ Q0) ** 2)
    after = np.sum((y - x_held @ P @ Q - delta) ** 2)
    assert after < 0.5 * before
    same_q, shift = refit_matrix(W, P, rows, refit=False, Q=Q0)
    np.testing.assert_array_equal(same_q, Q0)
    np.testing.assert_allclose(shift, (x_calib @ W - x_calib @ P @ Q0).mean(axis=0), atol=1e-9)


def _chain_cases(rng):
    """(name, result, kernel, groups) for every method, at full rank (exact) and truncated."""
    k2 = rng.standard_normal((16, 8, 3, 3))
    grouped = rng.standard_normal((12, 4, 3, 3))
    k1 = rng.standard_normal((8, 6, 5))
    # An exact CP-rank-5 kernel per group (2 groups) for cp / cp-depthwise.
    factors = [rng.standard_normal((2, size, 5)) for size in (6, 4, 3, 3)]
    cp_kernel = np.concatenate([np.einsum("tr,sr,ir,jr->tsij", *(f[g] for f in factors)) for g in range(2)])
    return [
        ("svd", channel_svd(k2, 16), channel_svd(k2, 4), k2, 1),
        ("svd-1d", channel_svd(k1, 8), channel_svd(k1, 3), k1, 1),
        ("svd-grouped", channel_svd(grouped, 6, groups=2), channel_svd(grouped, 2, groups=2), grouped, 2),
        ("spatial-svd", spatial_svd(k2, 24), spatial_svd(k2, 5), k2, 1),
        ("tiled-svd", tiled_svd(k2, (2, 2), 8), tiled_svd(k2, (2, 2), 3), k2, 1),
        ("tiled-svd-1x2", tiled_svd(k2, (1, 2), 16), tiled_svd(k2, (1, 2), 3), k2, 1),
        ("tiled-svd-2x1", tiled_svd(k2, (2, 1), 8), tiled_svd(k2, (2, 1), 3), k2, 1),
        ("tucker2", tucker2(grouped, (6, 4), groups=2), tucker2(grouped, (3, 2), groups=2), grouped, 2),
        ("tucker1-in", tucker2(k2, (None, 8)), tucker2(k2, (None, 3)), k2, 1),
        ("cp", cp(cp_kernel, 5, groups=2), cp(cp_kernel, 3, groups=2), cp_kernel, 2),
        ("cp-depthwise", cp_depthwise(cp_kernel, 5, groups=2), cp_depthwise(cp_kernel, 3, groups=2), cp_kernel, 2),
    ]


def test_refitted_chains_keep_their_layout_and_compute_the_composed_kernel():
    rng = np.random.default_rng(10)
    for name, full, truncated, kernel, groups in _chain_cases(rng):
        in_channels = kernel.shape[1] * groups
        spatial = [6] * (kernel.ndim - 2)
        x_calib = images(rng, 6, in_channels, spatial, mean=0.2)
        x_held = images(rng, 4, in_channels, spatial, mean=0.2)
        moments = conv_moments(x_calib, kernel.shape[2:], groups=groups, max_rows=64)

        # Full rank: the refit (tiny ridge) reproduces the kernel through every layout.
        new_last, delta = refit_chain(
            full.weights, full.groups_per_stage, full.groups_per_stage[-1], groups, moments, kernel,
            full._input_orders(), ridge=1e-10,
        )
        assert new_last.shape == full.weights[-1].shape and new_last.dtype == np.float32
        assert delta.shape == (kernel.shape[0],)
        rebuilt = compose_chain([*full.stages[:-1], new_last.astype(np.float64)], full.groups_per_stage, groups,
                                full._input_orders())
        reference = valid_conv(x_calib, kernel, groups)
        delta_map = delta.astype(np.float64).reshape(1, -1, *[1] * len(spatial))

        def in_sample_error(approx, shift=0.0):
            return np.linalg.norm(reference - valid_conv(x_calib, approx, groups) - shift) / np.linalg.norm(reference)

        error = in_sample_error(rebuilt, delta_map)
        if name.startswith("cp"):  # ALS is not exact: the refit (optimal in-sample) can only improve it
            assert error <= in_sample_error(full.to_tensor()) + 1e-9, name
        else:
            assert error < 1e-5, (name, error)

        # Truncated: the refitted chain, run as Convs (tiled shuffle included), equals the composed
        # kernel and, with the bias delta, beats the unrefitted chain on held-out images.
        refitted, delta = refit_factors(truncated, kernel, moments)
        assert [s.shape for s in refitted.stages] == [s.shape for s in truncated.stages]
        shuffle = (*truncated.tiles, truncated.ranks[0]) if getattr(truncated, "needs_shuffle", False) else None
        ran = run_chain(x_held, refitted.stages, refitted.groups_per_stage, shuffle)
        composed = compose_chain(refitted.stages, refitted.groups_per_stage, groups, refitted._input_orders())
        expect = valid_conv(x_held, composed, groups)
        np.testing.assert_allclose(ran, expect, atol=1e-9 * np.abs(expect).max())
        original = valid_conv(x_held, kernel, groups)
        before = np.sum((original - run_chain(x_held, truncated.stages, truncated.groups_per_stage, shuffle)) ** 2)
        after = np.sum((original - ran - delta.reshape(1, -1, *[1] * len(spatial))) ** 2)
        assert after < before, (name, after, before)


# ----------------------------------------------------------------------------- surface and errors


def test_results_are_deterministic(setting):
    kernel, calib, _ = setting
    moments = moments_of(calib)
    for make in (
        lambda: whitened_channel_svd(kernel, 1, 5, moments),
        lambda: whitened_spatial_svd(kernel, 1, 5, moments),
        lambda: whitened_tiled_svd(kernel, (2, 2), 3, moments),
        lambda: data_tucker2(kernel, 1, (5, 3), moments),
    ):
        first, second = make(), make()
        for a, b in zip(first.weights, second.weights, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: whitened_channel_svd(np.zeros((4, 2, 3, 3)), 1, 5, m), r"rank 5 exceeds the full rank 4"),
        (lambda m: whitened_channel_svd(np.zeros((4, 3, 3, 3)), 1, 2, m), r"1 groups x 18 .* needs 1 x 27"),
        (lambda m: whitened_channel_svd(np.zeros((4, 2, 3, 3)), 1, 2, "x"), r"expected a Moments accumulator"),
        (lambda m: whitened_spatial_svd(np.zeros((4, 2, 3)), 1, 2, m), r"N = 2 spatial dims"),
        (lambda m: whitened_tiled_svd(np.zeros((4, 2, 3, 3)), (3, 1), 1, m), r"3 row tiles do not divide 4"),
        (lambda m: data_tucker2(np.zeros((4, 2, 3, 3)), 1, (None, None), m), r"factor no mode"),
        (lambda m: data_tucker2(np.zeros((4, 2, 3, 3)), 1, (5, 1), m), r"output rank 5 exceeds"),
        (lambda m: im2col(np.zeros((1, 2, 2, 2)), (3, 3)), r"no output"),
        (lambda m: im2col(np.zeros((1, 3, 5, 5)), (3, 3), groups=2), r"3 input channels are not divisible by groups=2"),
        (lambda m: im2col(np.zeros((1, 3, 5)), (3, 3)), r"N = 2 spatial dims"),
        (lambda m: im2col(np.zeros((1, 3, 5, 5)), (3, 3), pads=(1, 1)), r"expected 4 values in pads"),
        (lambda m: same_pads([5], [3], mode="SAME"), r"auto_pad must be"),
        (lambda m: refit_last(np.zeros((2, 3)), np.zeros((2, 4)), np.eye(3), np.eye(3)), r"does not match"),
        (lambda m: whitened_svd(np.zeros((2, 3)), -np.eye(3), 1), r"not positive semi-definite"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    moments = Moments()
    moments.add(np.ones((1, 4, 18)))
    with pytest.raises(ValueError, match=message):
        call(moments)


# ----------------------------------------------------------------------------- sample space


def _both_forms(p, t=None):
    """The same vectors as dense moments and as sample-space moments."""
    dense, samples = Moments(), SampleMoments(capacity=p.shape[1])
    for form in (dense, samples):
        form.add(p, t)
    return dense, samples


@pytest.mark.parametrize("paired", [False, True])
def test_sample_space_statistics_give_the_dense_result_with_fewer_vectors_than_dimensions(paired):
    # 40 vectors of dimension 120: the dense moments are rank 40, the fits are the same.
    rng = np.random.default_rng(11)
    p = rng.standard_normal((1, 40, 120)) @ np.diag(np.logspace(0, -2, 120)) + 0.3
    t = p + 0.1 * rng.standard_normal(p.shape) if paired else None
    dense, samples = _both_forms(p, t)
    assert shrinkage(dense) == shrinkage(samples)
    W = rng.standard_normal((24, 120))
    eps = shrinkage(dense)
    for rank in (1, 6, 24):
        a_dense, b_dense, v_dense = whitened_rows(W, dense, rank, eps=eps)
        a_samples, b_samples, v_samples = whitened_rows(W, samples, rank, eps=eps)
        scale = np.abs(a_dense @ b_dense).max()
        np.testing.assert_allclose(a_samples @ b_samples, a_dense @ b_dense, atol=1e-8 * scale)
        np.testing.assert_allclose(v_samples, v_dense, rtol=1e-8, atol=1e-10 * v_dense[0])
    # Matrix refit with bias: the same second factor and bias shift.
    P = np.linalg.svd(W.T)[0][:, :5]
    q_dense, shift_dense = refit_matrix(W.T, P, dense)
    q_samples, shift_samples = refit_matrix(W.T, P, samples)
    np.testing.assert_allclose(q_samples, q_dense, rtol=1e-7, atol=1e-9 * np.abs(q_dense).max())
    np.testing.assert_allclose(shift_samples, shift_dense, rtol=1e-7, atol=1e-9 * np.abs(shift_dense).max())


def test_sample_space_conv_fits_equal_the_dense_ones():
    rng = np.random.default_rng(12)
    kernel = rng.standard_normal((8, 4, 3, 3))
    x = images(rng, 2, 4, (6, 6))                    # 2 x 4 x 4 = 32 patches of dimension 36
    patches = next(iter_patches(x, (3, 3), max_rows=None))
    dense, samples = _both_forms(patches)
    for fit in (lambda m: whitened_channel_svd(kernel, 1, 3, m, eps=shrinkage(m)),
                lambda m: whitened_tiled_svd(kernel, (2, 2), 2, m, eps=shrinkage(m))):
        np.testing.assert_allclose(fit(samples).to_tensor(), fit(dense).to_tensor(), rtol=1e-7, atol=1e-9)
    truncated = channel_svd(kernel, 3)
    refits = [refit_chain(truncated.weights, (1, 1), 1, 1, m, kernel) for m in (dense, samples)]
    np.testing.assert_allclose(refits[1][0], refits[0][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(refits[1][1], refits[0][1], rtol=1e-4, atol=1e-5)


def test_sample_space_moments_refuse_vectors_past_their_capacity():
    samples = SampleMoments(capacity=10)
    samples.add(np.ones((1, 8, 3)))
    with pytest.raises(ValueError, match="exceed the capacity 10"):
        samples.add(np.ones((1, 3, 3)))
