"""The factorizations' math: exactness at full rank, truncation bounds, stage layouts, errors.

The chain layouts are checked against an independent numpy convolution (valid padding,
stride 1): running the float32 stage weights as grouped Convs (with the tiled SVD's channel
shuffle done by Reshape/Transpose as the rewrite does) must match the original Conv.
The ONNX-level exactness of the rewrites is tested elsewhere.
"""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from onnx_lowrank.factorize import (
    channel_svd,
    hosvd_error_bound,
    spatial_svd,
    tiled_svd,
    truncated_svd,
    tucker2,
)

EXACT_RTOL = 1e-5  # full-rank reconstruction: float64 factors, so ~1e-15; 1e-5 is the contract
CHAIN_RTOL = 1e-5  # float32 stage weights chained, relative to the output norm
BOUND_SLACK = 1e-9  # float64 rounding in bound comparisons, relative to ||W||^2

HYPOTHESIS = settings(max_examples=50, deadline=None)


# ----------------------------------------------------------------------------- helpers


def conv(x: np.ndarray, weight: np.ndarray, group: int) -> np.ndarray:
    """Grouped N-D cross-correlation, valid padding, stride 1 (ONNX Conv semantics), float64."""
    batch = x.shape[0]
    out_channels, in_per_group, *kernel = weight.shape
    n = len(kernel)
    windows = sliding_window_view(x, kernel, axis=tuple(range(2, 2 + n)))  # [B, C, out.., k..]
    windows = windows.reshape(batch, group, in_per_group, *windows.shape[2:])
    grouped = weight.reshape(group, out_channels // group, in_per_group, *kernel)
    out_axes, k_axes = string.ascii_lowercase[:n], string.ascii_lowercase[n : 2 * n]
    y = np.einsum(f"BGC{out_axes}{k_axes},GOC{k_axes}->BGO{out_axes}", windows, grouped)
    return y.reshape(batch, out_channels, *y.shape[3:])


def run_chain(x: np.ndarray, factors) -> np.ndarray:
    """Run the result's float32 stage weights as Convs, shuffling like the rewrite for tiled SVD."""
    y = x
    for index, (weight, group) in enumerate(zip(factors.weights, factors.groups_per_stage, strict=True)):
        y = conv(y, weight.astype(np.float64), group)
        if index == 0 and getattr(factors, "needs_shuffle", False):
            rows, cols = factors.tiles
            shape = y.shape
            y = y.reshape(shape[0], cols, rows, factors.ranks[0], -1).transpose(0, 2, 1, 3, 4).reshape(shape)
    return y


def assert_chain_matches(factors, kernel: np.ndarray, groups: int, rng: np.random.Generator, target=None):
    """The chain on a random input equals the Conv with `target` (default: the input kernel)."""
    target = kernel if target is None else target
    spatial = kernel.shape[2:]
    x = rng.standard_normal((2, kernel.shape[1] * groups, *[k + 2 for k in spatial]))
    expected = conv(x, target.astype(np.float64), groups)
    got = run_chain(x, factors)
    assert got.shape == expected.shape
    assert np.linalg.norm(got - expected) <= CHAIN_RTOL * max(np.linalg.norm(expected), 1e-30)


def assert_common(factors, kernel: np.ndarray) -> None:
    """Attributes every result has: shapes, dtypes, params, reconstruction and its error."""
    assert factors.shape == kernel.shape
    assert len(factors.weights) == len(factors.groups_per_stage) == len(factors.stages)
    assert all(w.dtype == np.float32 and not w.flags.writeable for w in factors.weights)
    assert factors.n_params == sum(w.size for w in factors.weights)
    rebuilt = factors.to_tensor()
    assert rebuilt.shape == kernel.shape
    kernel = kernel.astype(np.float64)
    error = np.linalg.norm(rebuilt - kernel) / np.linalg.norm(kernel)
    assert factors.rel_error == pytest.approx(error, rel=1e-9, abs=1e-12)


@st.composite
def conv_cases(draw, dims=(1, 2, 3), max_groups=4):
    """(kernel [T, S/g, k..], groups) with small channel counts and kernels 1..5, non-square."""
    n = draw(st.sampled_from(dims))
    groups = draw(st.integers(1, max_groups))
    out_per_group = draw(st.integers(1, 6))
    in_per_group = draw(st.integers(1, 6))
    kernel = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    if n == 3:
        kernel = [min(k, 3) for k in kernel]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((groups * out_per_group, in_per_group, *kernel)).astype(np.float32)
    return weight, groups, rng


# ----------------------------------------------------------------------------- full rank is exact


@HYPOTHESIS
@given(conv_cases())
def test_channel_svd_full_rank_is_exact(case):
    kernel, groups, rng = case
    t_g, s_g, *spatial = kernel.shape
    t_g //= groups
    rank = min(t_g, s_g * math.prod(spatial))
    factors = channel_svd(kernel, rank, groups=groups)
    assert_common(factors, kernel)
    assert factors.rel_error < EXACT_RTOL
    assert factors.weights[0].shape == (groups * rank, s_g, *spatial)
    assert factors.weights[1].shape == (groups * t_g, rank, *[1] * len(spatial))
    assert factors.groups_per_stage == (groups, groups)
    assert factors.ranks == (rank,) and factors.method == "svd"
    assert len(factors.singular_values) == groups
    assert_chain_matches(factors, kernel, groups, rng)


@HYPOTHESIS
@given(conv_cases(dims=(2,)))
def test_spatial_svd_full_rank_is_exact(case):
    kernel, groups, rng = case
    t_g, s_g, kh, kw = kernel.shape
    t_g //= groups
    rank = min(s_g * kh, t_g * kw)
    factors = spatial_svd(kernel, rank, groups=groups)
    assert_common(factors, kernel)
    assert factors.rel_error < EXACT_RTOL
    assert factors.weights[0].shape == (groups * rank, s_g, kh, 1)
    assert factors.weights[1].shape == (groups * t_g, rank, 1, kw)
    assert factors.groups_per_stage == (groups, groups)
    assert_chain_matches(factors, kernel, groups, rng)


@st.composite
def tiled_cases(draw):
    n = draw(st.sampled_from((1, 2, 3)))
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (rows * draw(st.integers(1, 4)), cols * draw(st.integers(1, 4)), *kernel)
    return rng.standard_normal(shape).astype(np.float32), (rows, cols), rng


@HYPOTHESIS
@given(tiled_cases())
def test_tiled_svd_full_rank_is_exact(case):
    kernel, (rows, cols), rng = case
    t, s, *spatial = kernel.shape
    rank = min(t // rows, s // cols * math.prod(spatial))
    factors = tiled_svd(kernel, (rows, cols), rank)
    assert_common(factors, kernel)
    assert factors.rel_error < EXACT_RTOL
    assert factors.weights[0].shape == (cols * rows * rank, s // cols, *spatial)
    assert factors.weights[1].shape == (t, cols * rank, *[1] * len(spatial))
    assert factors.groups_per_stage == (cols, rows)
    assert factors.tiles == (rows, cols)
    assert factors.needs_shuffle == (rows > 1 and cols > 1)
    assert_chain_matches(factors, kernel, 1, rng)


@HYPOTHESIS
@given(conv_cases(), st.sampled_from(("tucker2", "tucker1-in", "tucker1-out")))
def test_tucker_full_rank_is_exact(case, variant):
    kernel, groups, rng = case
    t_g, s_g, *spatial = kernel.shape
    t_g //= groups
    ranks = {"tucker2": (t_g, s_g), "tucker1-in": (None, s_g), "tucker1-out": (t_g, None)}[variant]
    factors = tucker2(kernel, ranks, groups=groups)
    assert_common(factors, kernel)
    assert factors.rel_error < EXACT_RTOL
    assert factors.method == variant and factors.ranks == (t_g, s_g)
    ones = [1] * len(spatial)
    expected = {
        "tucker2": [(groups * s_g, s_g, *ones), (groups * t_g, s_g, *spatial), (groups * t_g, t_g, *ones)],
        "tucker1-in": [(groups * s_g, s_g, *ones), (groups * t_g, s_g, *spatial)],
        "tucker1-out": [(groups * t_g, s_g, *spatial), (groups * t_g, t_g, *ones)],
    }[variant]
    assert [w.shape for w in factors.weights] == expected
    assert factors.groups_per_stage == (groups,) * len(expected)
    assert_chain_matches(factors, kernel, groups, rng)


# ----------------------------------------------------------------------------- truncation


@HYPOTHESIS
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1), st.data())
def test_truncated_svd_obeys_eckart_young(rows, cols, seed, data):
    matrix = np.random.default_rng(seed).standard_normal((rows, cols))
    rank = data.draw(st.integers(1, min(rows, cols)))
    factors = truncated_svd(matrix, rank)
    reference = np.linalg.svd(matrix, compute_uv=False)
    norm2 = float(np.sum(matrix**2))
    np.testing.assert_allclose(factors.singular_values, reference, atol=1e-7 * reference[0])
    error2 = factors.rel_error**2 * norm2
    assert error2 == pytest.approx(float(np.sum(reference[rank:] ** 2)), abs=BOUND_SLACK * norm2)
    assert factors.left.shape == (rows, rank) and factors.right.shape == (rank, cols)
    # Sigma split evenly: left^T left = right right^T = diag(sigma_r).
    np.testing.assert_allclose(factors.left.T @ factors.left, np.diag(reference[:rank]), atol=1e-7 * reference[0])
    np.testing.assert_allclose(factors.right @ factors.right.T, np.diag(reference[:rank]), atol=1e-7 * reference[0])
    assert [w.dtype for w in factors.weights] == [np.float32, np.float32]
    assert factors.groups_per_stage == (1, 1)
    np.testing.assert_allclose(factors.to_tensor(), factors.left @ factors.right)


def test_truncated_svd_sign_convention():
    matrix = np.random.default_rng(3).standard_normal((9, 5))
    left = truncated_svd(matrix, 4).left
    assert np.all(left[np.argmax(np.abs(left), axis=0), np.arange(4)] > 0)
    flipped = truncated_svd(-matrix, 4)
    np.testing.assert_allclose(flipped.left, left, atol=1e-12)


@HYPOTHESIS
@given(conv_cases(), st.data())
def test_channel_svd_truncation_error_is_the_discarded_energy(case, data):
    kernel, groups, _ = case
    t_g, s_g, *spatial = kernel.shape
    full = min(t_g // groups, s_g * math.prod(spatial))
    rank = data.draw(st.integers(1, full))
    factors = channel_svd(kernel, rank, groups=groups)
    norm2 = float(np.sum(kernel.astype(np.float64) ** 2))
    discarded = sum(float(np.sum(values[rank:] ** 2)) for values in factors.singular_values)
    assert factors.rel_error**2 * norm2 == pytest.approx(discarded, abs=BOUND_SLACK * norm2)


@HYPOTHESIS
@given(conv_cases(), st.data(), st.sampled_from((0, 3)))
def test_tucker_hosvd_bound_holds(case, data, n_iter_max):
    kernel, groups, _ = case
    t_g, s_g = kernel.shape[0] // groups, kernel.shape[1]
    ranks = (
        data.draw(st.one_of(st.none(), st.integers(1, t_g))),
        data.draw(st.one_of(st.none(), st.integers(1, s_g))),
    )
    if ranks == (None, None):
        ranks = (1, None)
    factors = tucker2(kernel, ranks, groups=groups, n_iter_max=n_iter_max)
    assert_common(factors, kernel)
    bound = hosvd_error_bound(factors.mode_spectra, ranks)
    assert bound == pytest.approx(factors.error_bound)
    assert factors.rel_error <= bound + 1e-9
    # Mode spectra are the singular values of the unfoldings.
    block = kernel[:t_g].astype(np.float64)
    out_values, in_values = factors.mode_spectra[0]
    np.testing.assert_allclose(out_values, np.linalg.svd(block.reshape(t_g, -1), compute_uv=False), atol=1e-5)
    unfolded_in = np.moveaxis(block, 1, 0).reshape(s_g, -1)
    np.testing.assert_allclose(in_values, np.linalg.svd(unfolded_in, compute_uv=False), atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 8, 1, 1), (8, 32, 1, 1), (16, 2, 3), (5, 40, 1, 1, 1), (12, 12, 3, 3)])
@pytest.mark.parametrize("n_iter_max", [0, 4])
def test_tucker_bases_are_orthonormal_and_meet_the_bound(shape, n_iter_max):
    """Tall or wide unfoldings (1x1 expansion convs) take the small-Gram path, same guarantees."""
    kernel = np.random.default_rng(4).standard_normal(shape)
    ranks = (max(1, shape[0] // 3), max(1, shape[1] // 3))
    factors = tucker2(kernel, ranks, n_iter_max=n_iter_max)
    in_basis = factors.stages[0].reshape(ranks[1], shape[1]).T
    out_basis = factors.stages[2].reshape(shape[0], ranks[0])
    for basis in (in_basis, out_basis):
        np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-10)
    assert factors.rel_error <= factors.error_bound + 1e-9
    for values, size in zip(factors.mode_spectra[0], shape[:2], strict=True):
        assert len(values) == min(size, kernel.size // size)


def test_hooi_does_not_increase_the_error():
    kernel = np.random.default_rng(5).standard_normal((16, 12, 3, 3))
    hosvd = tucker2(kernel, (5, 4))
    hooi = tucker2(kernel, (5, 4), n_iter_max=20)
    assert hosvd.n_iter == 0 and 1 <= hooi.n_iter <= 20
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    assert hooi.rel_error <= hosvd.error_bound


def test_hosvd_bound_is_tight_for_one_mode():
    """Tucker-1 is a truncated SVD of one unfolding: the bound is met with equality."""
    kernel = np.random.default_rng(6).standard_normal((10, 7, 3))
    factors = tucker2(kernel, (4, None))
    assert factors.rel_error == pytest.approx(factors.error_bound, rel=1e-9)


# ----------------------------------------------------------------------------- groups and layout


def test_grouped_factors_are_the_per_group_factors_stacked():
    rng = np.random.default_rng(7)
    groups, t_g, s_g = 3, 4, 5
    kernel = rng.standard_normal((groups * t_g, s_g, 3, 3))
    cases = [
        (lambda w, g: channel_svd(w, 3, groups=g)),
        (lambda w, g: spatial_svd(w, 4, groups=g)),
        (lambda w, g: tucker2(w, (3, 2), groups=g)),
    ]
    for factor in cases:
        grouped = factor(kernel, groups)
        singles = [factor(kernel[i * t_g : (i + 1) * t_g], 1) for i in range(groups)]
        for stage, parts in zip(grouped.stages, zip(*(s.stages for s in singles), strict=True), strict=True):
            np.testing.assert_array_equal(stage, np.concatenate(parts, axis=0))
        rebuilt = np.concatenate([s.to_tensor() for s in singles], axis=0)
        np.testing.assert_allclose(grouped.to_tensor(), rebuilt, atol=1e-12)


def test_tiled_svd_layout_matches_the_formula():
    """Stage 1 group j holds B_0j..B_(a-1)j; stage 2 group i holds [A_i0 | A_i1 | ...]."""
    rng = np.random.default_rng(8)
    rows, cols, rank = 2, 3, 2
    kernel = rng.standard_normal((6, 9, 3, 3))
    factors = tiled_svd(kernel, (rows, cols), rank)
    first, second = factors.stages
    tile_out, tile_in = 3, 3
    for i in range(rows):
        for j in range(cols):
            tile = kernel[i * tile_out : (i + 1) * tile_out, j * tile_in : (j + 1) * tile_in]
            single = channel_svd(tile, rank)
            b_ij = first[(j * rows + i) * rank : (j * rows + i + 1) * rank]
            a_ij = second[i * tile_out : (i + 1) * tile_out, j * rank : (j + 1) * rank]
            np.testing.assert_allclose(b_ij, single.stages[0], atol=1e-12)
            np.testing.assert_allclose(a_ij, single.stages[1], atol=1e-12)
    assert factors.shuffle_order is not None
    assert_chain_matches(factors, kernel, 1, rng, target=factors.to_tensor())


def test_truncated_chains_compute_their_reconstruction():
    """At truncated ranks the chain computes exactly to_tensor() (the layout, not the rank)."""
    rng = np.random.default_rng(9)
    kernel = rng.standard_normal((8, 6, 3, 2))
    for factors in (
        channel_svd(kernel, 3),
        spatial_svd(kernel, 3),
        tiled_svd(kernel, (2, 2), 2),
        tucker2(kernel, (3, 2)),
        tucker2(kernel, (None, 2)),
        tucker2(kernel, (3, None)),
    ):
        assert_common(factors, kernel)
        assert factors.rel_error > 1e-3
        assert_chain_matches(factors, kernel, 1, rng, target=factors.to_tensor())


def test_results_are_deterministic():
    kernel = np.random.default_rng(10).standard_normal((12, 8, 3, 3)).astype(np.float32)
    runs = [
        (lambda: channel_svd(kernel, 5)),
        (lambda: spatial_svd(kernel, 5, groups=2)),
        (lambda: tiled_svd(kernel, (2, 2), 3)),
        (lambda: tucker2(kernel, (4, 3), n_iter_max=3)),
        (lambda: truncated_svd(kernel.reshape(12, -1), 5)),
    ]
    for run in runs:
        first, second = run(), run()
        assert [w.tobytes() for w in first.weights] == [w.tobytes() for w in second.weights]


def test_zero_kernel_factors_to_zero():
    kernel = np.zeros((4, 3, 3, 3), dtype=np.float32)
    for factors in (channel_svd(kernel, 2), spatial_svd(kernel, 2), tucker2(kernel, (2, 2))):
        assert factors.rel_error == 0.0
        assert not np.any(factors.to_tensor())


# ----------------------------------------------------------------------------- bad input


KERNEL = np.zeros((64, 32, 3, 3), dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: channel_svd(KERNEL, 70),
            r"^channel_svd: rank 70 exceeds the full rank 64 of a \[64, 32, 3, 3\] kernel$",
        ),
        (lambda: channel_svd(KERNEL, 40, groups=2), r"full rank 32 .* groups=2"),
        (lambda: channel_svd(KERNEL, 0), r"rank must be >= 1, found 0"),
        (lambda: channel_svd(KERNEL, 2.5), r"rank must be an integer, found 2.5"),
        (lambda: channel_svd(KERNEL, True), r"rank must be an integer"),
        (lambda: channel_svd(KERNEL, 4, groups=3), r"64 output channels .* not divisible by groups=3"),
        (lambda: channel_svd(KERNEL.astype(np.int64), 4), r"floating-point kernel, found dtype int64"),
        (lambda: channel_svd(KERNEL.tolist(), 4), r"numpy array, found list"),
        (lambda: channel_svd(KERNEL[:, :, 0, 0], 4), r"found shape \[64, 32\] \(0 spatial dims\)"),
        (lambda: channel_svd(np.full((4, 4, 3), np.nan), 2), r"NaN or Inf"),
        (lambda: spatial_svd(KERNEL, 97), r"full rank 96"),
        (lambda: spatial_svd(KERNEL[..., 0], 2), r"^spatial_svd: .*N = 2 spatial dims, found shape \[64, 32, 3\]"),
        (lambda: spatial_svd(KERNEL[..., None], 2), r"found shape \[64, 32, 3, 3, 1\] \(3 spatial dims\)"),
        (lambda: tiled_svd(KERNEL, (2, 3), 4), r"^tiled_svd: 3 column tiles do not divide 32 input channels$"),
        (lambda: tiled_svd(KERNEL, (3, 2), 4), r"^tiled_svd: 3 row tiles do not divide 64 output channels$"),
        (lambda: tiled_svd(KERNEL, (2, 2), 33), r"rank 33 exceeds the full rank 32"),
        (lambda: tiled_svd(KERNEL, (2, 2), 4, groups=2), r"ungrouped kernel \(groups=1\), found groups=2"),
        (lambda: tiled_svd(KERNEL, 2, 4), r"tiles must be a pair"),
        (lambda: tucker2(KERNEL, (65, 4)), r"output rank 65 exceeds the full rank 64"),
        (lambda: tucker2(KERNEL, (4, 33)), r"input rank 33 exceeds the full rank 32"),
        (lambda: tucker2(KERNEL, (None, None)), r"factor no mode"),
        (lambda: tucker2(KERNEL, 4), r"ranks must be a pair"),
        (lambda: tucker2(KERNEL, (4, 4), n_iter_max=-1), r"n_iter_max must be >= 0"),
        (
            lambda: truncated_svd(np.zeros((5, 3)), 4),
            r"^truncated_svd: rank 4 exceeds the full rank 3 of a \[5, 3\] matrix$",
        ),
        (lambda: truncated_svd(np.zeros((5, 3, 1)), 1), r"expected a 2-D matrix \[K, N\], found shape \[5, 3, 1\]"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
