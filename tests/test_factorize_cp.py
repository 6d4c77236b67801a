"""CP and CP-depthwise: exact recovery of CP-rank-R kernels, fit versus rank, layout, determinism.

CP is not exact at a fixed rank in general, so exactness is tested on kernels built as exact
rank-R CP tensors (with R <= T/g, S/g, where the algebraic init makes recovery reliable).
"""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from onnx_lowrank.factorize import cp, cp_depthwise

RECOVERY_RTOL = 1e-4  # exact rank-R kernels, recovered by ALS to its stopping tolerance
CHAIN_RTOL = 1e-5  # float32 stage weights chained, relative to the output norm
FIT_SLACK = 1e-3  # ALS is a local method: fits at consecutive ranks may tie up to this


def conv(x: np.ndarray, weight: np.ndarray, group: int) -> np.ndarray:
    """Grouped N-D cross-correlation, valid padding, stride 1 (ONNX Conv semantics), float64."""
    batch = x.shape[0]
    out_channels, in_per_group, *kernel = weight.shape
    n = len(kernel)
    windows = sliding_window_view(x, kernel, axis=tuple(range(2, 2 + n)))
    windows = windows.reshape(batch, group, in_per_group, *windows.shape[2:])
    grouped = weight.reshape(group, out_channels // group, in_per_group, *kernel)
    out_axes, k_axes = string.ascii_lowercase[:n], string.ascii_lowercase[n : 2 * n]
    y = np.einsum(f"BGC{out_axes}{k_axes},GOC{k_axes}->BGO{out_axes}", windows, grouped)
    return y.reshape(batch, out_channels, *y.shape[3:])


def cp_kernel(rng, groups: int, t_g: int, s_g: int, spatial, rank: int, flatten: bool = False) -> np.ndarray:
    """A grouped kernel whose groups are exact rank-R CP tensors (3-way when `flatten`)."""
    modes = [t_g, s_g, math.prod(spatial)] if flatten else [t_g, s_g, *spatial]
    blocks = []
    for _ in range(groups):
        factors = [rng.standard_normal((size, rank)) for size in modes]
        letters = string.ascii_lowercase[: len(modes)]
        block = np.einsum(",".join(f"{c}z" for c in letters) + f"->{letters}", *factors)
        blocks.append(block.reshape(t_g, s_g, *spatial))
    return np.concatenate(blocks, axis=0)


RECOVERY_CASES = [
    # groups, T/g, S/g, spatial, R
    (1, 8, 6, (3, 3), 4),
    (1, 6, 6, (3, 3), 6),
    (1, 10, 7, (3,), 5),
    (1, 5, 6, (3, 2, 2), 3),
    (1, 12, 9, (5, 5), 9),
    (2, 6, 5, (3, 3), 3),
    (3, 4, 4, (2, 3), 4),
    (1, 7, 5, (1, 4), 5),
]


@pytest.mark.parametrize(("groups", "t_g", "s_g", "spatial", "rank"), RECOVERY_CASES)
def test_cp_recovers_exact_rank_r_kernels(groups, t_g, s_g, spatial, rank):
    rng = np.random.default_rng([groups, t_g, s_g, *spatial, rank])
    kernel = cp_kernel(rng, groups, t_g, s_g, spatial, rank)
    factors = cp(kernel, rank, groups=groups, n_iter_max=1000, tol=1e-12)
    assert factors.rel_error < RECOVERY_RTOL
    assert factors.fit == pytest.approx(1 - factors.rel_error)
    ones = [1] * len(spatial)
    expected = [(groups * rank, s_g, *ones)]
    for dim, size in enumerate(spatial):
        shape = list(ones)
        shape[dim] = size
        expected.append((groups * rank, 1, *shape))
    expected.append((groups * t_g, rank, *ones))
    assert [w.shape for w in factors.weights] == expected
    assert factors.groups_per_stage == (groups, *[groups * rank] * len(spatial), groups)
    assert factors.method == "cp" and factors.ranks == (rank,)
    assert factors.n_params == sum(w.size for w in factors.weights)
    assert_chain_matches(factors, kernel, groups, rng)


@pytest.mark.parametrize(("groups", "t_g", "s_g", "spatial", "rank"), RECOVERY_CASES)
def test_cp_depthwise_recovers_exact_rank_r_kernels(groups, t_g, s_g, spatial, rank):
    rng = np.random.default_rng([groups, s_g, t_g, *spatial, rank, 1])
    kernel = cp_kernel(rng, groups, t_g, s_g, spatial, rank, flatten=True)
    factors = cp_depthwise(kernel, rank, groups=groups, n_iter_max=1000, tol=1e-12)
    assert factors.rel_error < RECOVERY_RTOL
    ones = [1] * len(spatial)
    assert [w.shape for w in factors.weights] == [
        (groups * rank, s_g, *ones),
        (groups * rank, 1, *spatial),
        (groups * t_g, rank, *ones),
    ]
    assert factors.groups_per_stage == (groups, groups * rank, groups)
    assert factors.method == "cp-depthwise"
    assert_chain_matches(factors, kernel, groups, rng)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 8),
    st.integers(1, 8),
    st.lists(st.integers(1, 4), min_size=1, max_size=3).filter(lambda k: math.prod(k) >= 2),
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.data(),
)
def test_cp_recovery_over_drawn_shapes(groups, t_g, s_g, spatial, flatten, seed, data):
    """Any CP-rank-R kernel with R <= T/g, S/g and prod(k) >= 2 is recovered (GEVD init + ALS)."""
    rank = data.draw(st.integers(1, min(t_g, s_g)))
    rng = np.random.default_rng(seed)
    kernel = cp_kernel(rng, groups, t_g, s_g, tuple(spatial), rank, flatten=flatten)
    method = cp_depthwise if flatten else cp
    factors = method(kernel, rank, groups=groups, n_iter_max=1000, tol=1e-12)
    assert factors.rel_error < RECOVERY_RTOL


def assert_chain_matches(factors, kernel, groups, rng):
    """The float32 chain on a random input equals the Conv with the reconstruction."""
    x = rng.standard_normal((2, kernel.shape[1] * groups, *[k + 2 for k in kernel.shape[2:]]))
    expected = conv(x, factors.to_tensor(), groups)
    got = x
    for weight, group in zip(factors.weights, factors.groups_per_stage, strict=True):
        got = conv(got, weight.astype(np.float64), group)
    assert np.linalg.norm(got - expected) <= CHAIN_RTOL * np.linalg.norm(expected)


@pytest.mark.parametrize("method", [cp, cp_depthwise])
def test_cp_fit_does_not_decrease_with_rank(method):
    kernel = np.random.default_rng(11).standard_normal((8, 6, 3, 3))
    fits = [method(kernel, rank, n_iter_max=300, tol=1e-10).fit for rank in range(1, 9)]
    assert all(0 <= fit <= 1 for fit in fits)
    assert np.all(np.diff(fits) >= -FIT_SLACK), fits


@pytest.mark.parametrize("method", [cp, cp_depthwise])
def test_cp_is_deterministic_for_a_seed(method):
    kernel = np.random.default_rng(12).standard_normal((10, 8, 3, 3)).astype(np.float32)
    first, second = (method(kernel, 6, groups=2, n_iter_max=30, time_limit_s=None, seed=4) for _ in range(2))
    assert [w.tobytes() for w in first.weights] == [w.tobytes() for w in second.weights]
    assert first.n_iter == second.n_iter and first.stop_reason == second.stop_reason


def test_cp_rank_above_the_channels_uses_the_full_subspace():
    """R > T, S: the compression is exact and ALS starts from the SVD init only."""
    kernel = np.random.default_rng(13).standard_normal((4, 3, 3, 3))
    low, high = cp(kernel, 6, n_iter_max=200), cp(kernel, 12, n_iter_max=200)
    assert high.fit >= low.fit - FIT_SLACK
    assert high.to_tensor().shape == kernel.shape


def test_cp_stops_at_the_time_limit():
    kernel = np.random.default_rng(14).standard_normal((16, 16, 3, 3))
    factors = cp(kernel, 8, n_iter_max=1000, time_limit_s=1e-6, tol=0.0)
    assert factors.stop_reason == "time_limit"
    assert factors.n_iter < 1000
    assert 0 < factors.fit < 1


def test_cp_stop_reasons():
    kernel = np.random.default_rng(15).standard_normal((8, 8, 3, 3))
    assert cp(kernel, 4, n_iter_max=5, tol=0.0).stop_reason == "n_iter_max"
    assert cp(kernel, 4, n_iter_max=5, tol=0.0).n_iter == 5
    assert cp(kernel, 4, n_iter_max=1000, tol=1e-3).stop_reason == "tol"


def test_cp_of_a_zero_kernel():
    factors = cp(np.zeros((4, 4, 3, 3)), 2)
    assert factors.rel_error == 0.0 and not np.any(factors.to_tensor())


KERNEL = np.zeros((16, 8, 3, 3), dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cp(KERNEL, 0), r"^cp: rank must be >= 1, found 0$"),
        (lambda: cp(KERNEL, 73), r"^cp: rank 73 exceeds the largest possible CP rank 72 of a \[16, 8, 3, 3\] kernel$"),
        (lambda: cp_depthwise(KERNEL, 73), r"^cp_depthwise: rank 73 exceeds"),
        (lambda: cp(KERNEL, 4, groups=3), r"not divisible by groups=3"),
        (lambda: cp(KERNEL, 4, n_iter_max=0), r"n_iter_max must be >= 1"),
        (lambda: cp(KERNEL, 4, time_limit_s=0), r"time_limit_s must be a positive number or None"),
        (lambda: cp(KERNEL, 4, tol=-1.0), r"tol must be a number >= 0"),
        (lambda: cp(KERNEL, 4, seed=-1), r"seed must be >= 0"),
        (lambda: cp(KERNEL[:, :, 0, 0], 4), r"found shape \[16, 8\]"),
    ],
)
def test_cp_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
