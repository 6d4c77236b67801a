"""Rank policies, rank grids, error curves and the budget allocator, against known answers.

Energy ranks on hand-made spectra; EVBMF recovers planted ranks under Gaussian noise and keeps
pure noise at rank 1; error curves equal numpy's truncated SVD (and bound HOSVD); the allocator
is checked against brute force over every combination of small instances.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.allocation import Allocation, LayerOptions, Option, allocate
from onnx_lowrank.ranks import (
    VBMF,
    Energy,
    FixedRank,
    ModeSpectrum,
    RankRatio,
    evbmf,
    rank_grid,
    snap,
    svd_error_curve,
    tucker_error_curve,
)

EXACT = 1e-12  # sums of a handful of float64 errors: only rounding separates equal totals
HYP = settings(max_examples=150, deadline=None, derandomize=True)


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(matrix, compute_uv=False)


def planted(shape, rank, seed, noise=1.0, snr=3.0):
    """A rank-`rank` matrix plus i.i.d. N(0, noise²) entries.

    The planted singular values run from `snr` to 3·`snr` times the unit noise edge
    ``√L + √M`` (the largest singular value of unit-variance noise), so every component is
    clearly above the EVB threshold, about 1.1x the edge of the noise actually added.
    """
    rng = np.random.default_rng(seed)
    L, M = shape
    u = np.linalg.qr(rng.standard_normal((L, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((M, rank)))[0]
    edge = math.sqrt(L) + math.sqrt(M)
    s = np.linspace(snr, 3 * snr, rank) * edge
    return (u * s) @ v.T + noise * rng.standard_normal(shape)


# --- fixed policies: unchanged, spectra ignored -------------------------------------------------


def test_fixed_policies_unchanged_and_ignore_spectra():
    spectra = (ModeSpectrum(np.array([3.0, 2.0, 1.0]), (3, 5)),)
    assert FixedRank(4).ranks((10, 3)) == (4, 3)
    assert FixedRank(4).ranks((10,), spectra) == (4,)
    assert RankRatio(0.5).ranks((10, 3, 1)) == (5, 2, 1)
    assert RankRatio(0.5).ranks((10,), spectra) == (5,)


# --- ModeSpectrum --------------------------------------------------------------------------------


def test_mode_spectrum_normalises_and_validates():
    s = ModeSpectrum(np.array([1.0, 3.0, 2.0]), (3, 4))
    assert s.groups == 1 and s.shape == (3, 4)
    np.testing.assert_array_equal(s.values[0], [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(ModeSpectrum((np.array([2.0, 1.0]), np.array([1.0, 1.0])),
                                               (2, 2)).pooled_energy(), [5.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        ModeSpectrum(np.array([1.0, -1.0]), (2, 2))
    with pytest.raises(ValueError, match="at most 2"):
        ModeSpectrum(np.ones(3), (2, 5))
    with pytest.raises(ValueError, match="as many"):
        ModeSpectrum((np.ones(2), np.ones(1)), (2, 2))


# --- Energy --------------------------------------------------------------------------------------


def test_energy_hand_made_spectrum():
    spectra = (ModeSpectrum(np.array([4.0, 2.0, 1.0, 1.0]), (4, 9)),)  # σ² = 16, 4, 1, 1 of 22
    assert Energy(0.5).ranks((4,), spectra) == (1,)
    assert Energy(16 / 22).ranks((4,), spectra) == (1,)   # exactly reached at rank 1
    assert Energy(0.9).ranks((4,), spectra) == (2,)       # 20/22 = 0.909
    assert Energy(20 / 22).ranks((4,), spectra) == (2,)
    assert Energy(0.95).ranks((4,), spectra) == (3,)      # 21/22 = 0.955
    assert Energy(1.0).ranks((4,), spectra) == (4,)
    assert Energy(1.0).ranks((2,), spectra) == (2,)       # capped at the full rank


def test_energy_pools_groups_and_handles_each_mode():
    # Group energies 9,1 and 4,4: pooled 13, 5 of 18. At 0.7 the pool needs 1 component,
    # although the second group alone would need 2; every group gets the same rank.
    grouped = ModeSpectrum((np.array([3.0, 1.0]), np.array([2.0, 2.0])), (2, 6))
    flat = ModeSpectrum(np.sqrt([0.72, 0.2, 0.08]), (3, 3))  # 72 % in the first component
    assert Energy(0.7).ranks((2, 3), (grouped, flat)) == (1, 1)
    assert Energy(0.75).ranks((2, 3), (grouped, flat)) == (2, 2)
    with pytest.raises(ValueError, match="needs the singular values"):
        Energy(0.9).ranks((2,))
    with pytest.raises(ValueError, match="one spectrum per mode"):
        Energy(0.9).ranks((2, 3), (grouped,))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Energy(0.0)


@HYP
@given(values=st.lists(st.floats(0, 100), min_size=1, max_size=20),
       fraction=st.floats(0.01, 1.0))
def test_energy_rank_is_the_smallest_that_keeps_the_fraction(values, fraction):
    sq = np.sort(np.square(values))[::-1]
    if sq.sum() == 0:
        return
    spectrum = ModeSpectrum(np.sqrt(sq), (len(values), 30))
    (r,) = Energy(fraction).ranks((len(values),), (spectrum,))
    kept = np.cumsum(sq)
    assert kept[r - 1] >= fraction * kept[-1] * (1 - 1e-9)
    if r > 1:
        assert kept[r - 2] < fraction * kept[-1]


# --- VBMF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 128), (200, 50), (100, 100), (32, 300)])
@pytest.mark.parametrize("rank", [1, 3, 8, 15])
def test_vbmf_recovers_planted_rank(shape, rank):
    for seed in range(2):
        y = planted(shape, rank, seed)
        estimate = evbmf(ModeSpectrum(singular_values(y), shape))
        assert estimate.rank == rank, (shape, rank, seed, estimate)
        assert estimate.sigma2 == pytest.approx(1.0, rel=0.1)  # the planted noise variance
        assert VBMF().ranks((min(shape),), (ModeSpectrum(singular_values(y), shape),)) == (rank,)


@pytest.mark.parametrize("shape", [(64, 128), (200, 50), (100, 100), (16, 16)])
def test_vbmf_pure_noise_keeps_one(shape):
    for seed in range(3):
        noise = np.random.default_rng(seed).standard_normal(shape)
        estimate = evbmf(ModeSpectrum(singular_values(noise), shape))
        assert estimate.counts == (0,) and estimate.rank == 1
        assert estimate.sigma2 == pytest.approx(1.0, rel=0.2)  # 16x16: few values to fit


def test_vbmf_is_scale_invariant_and_transposable():
    y = planted((80, 120), 6, seed=3)
    base = evbmf(ModeSpectrum(singular_values(y), (80, 120)))
    scaled = evbmf(ModeSpectrum(singular_values(1e-3 * y), (80, 120)))
    transposed = evbmf(ModeSpectrum(singular_values(y.T), (120, 80)))
    assert base.rank == scaled.rank == transposed.rank == 6
    assert scaled.sigma2 == pytest.approx(1e-6 * base.sigma2, rel=1e-6)
    # σ² sits at a smooth minimum of Ω, so rounding moves it by about sqrt(eps)
    assert transposed.sigma2 == pytest.approx(base.sigma2, rel=1e-6)


def test_vbmf_exact_low_rank_and_zero():
    y = planted((40, 60), 5, seed=0, noise=0.0)
    assert evbmf(ModeSpectrum(singular_values(y), (40, 60))).rank == 5
    assert evbmf(ModeSpectrum(np.zeros(4), (4, 4))).rank == 1


def test_vbmf_groups_share_one_noise_level_and_rank():
    shape = (32, 96)
    groups = tuple(singular_values(planted(shape, 4, seed)) for seed in range(4))
    estimate = evbmf(ModeSpectrum(groups, shape))
    assert estimate.counts == (4, 4, 4, 4) and estimate.rank == 4
    assert estimate.sigma2 == pytest.approx(1.0, rel=0.1)


def test_vbmf_tucker2_modes_of_a_planted_kernel():
    """Kim et al.'s recipe: EVBMF on the output- and input-channel unfoldings of a conv kernel."""
    rng = np.random.default_rng(7)
    t, s, k, rt, rs = 64, 48, 3, 10, 6
    core = rng.standard_normal((rt, rs, k, k))
    a = np.linalg.qr(rng.standard_normal((t, rt)))[0]
    b = np.linalg.qr(rng.standard_normal((s, rs)))[0]
    kernel = np.einsum("ti,sj,ijxy->tsxy", a, b, core)
    kernel *= 30 / np.linalg.norm(kernel) * math.sqrt(rt)
    kernel += 0.02 * rng.standard_normal(kernel.shape)
    out_mode = kernel.reshape(t, -1)
    in_mode = kernel.transpose(1, 0, 2, 3).reshape(s, -1)
    spectra = (ModeSpectrum(singular_values(out_mode), out_mode.shape),
               ModeSpectrum(singular_values(in_mode), in_mode.shape))
    assert VBMF().ranks((t, s), spectra) == (rt, rs)
    with pytest.raises(ValueError, match="needs the singular values"):
        VBMF().ranks((t, s))


# --- snap and rank_grid --------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "multiple", "full", "expected"), [
    (20, 16, 64, 16), (24, 16, 64, 32), (23, 16, 64, 16), (0, 16, 64, 16), (5, 16, 64, 16),
    (100, 16, 64, 64), (47, 16, 50, 48), (60, 16, 50, 50), (39, 16, 42, 32), (41, 16, 42, 42),
    (7, 16, 10, 10), (7, 1, 10, 7), (12, 1, 10, 10), (3, 4, 4, 4),
])
def test_snap_examples(rank, multiple, full, expected):
    assert snap(rank, multiple, full) == expected


@HYP
@given(rank=st.integers(0, 600), multiple=st.integers(1, 32), full=st.integers(1, 512))
def test_snap_properties(rank, multiple, full):
    r = snap(rank, multiple, full)
    if full < multiple:
        assert r == full
        return
    assert multiple <= r <= full
    assert r % multiple == 0 or r == full
    nearest = max(multiple, multiple * round(rank / multiple + 1e-9))
    assert r == min(nearest, full) or abs(r - rank) <= abs(nearest - rank)


def test_snap_and_grid_reject_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        snap(5, 0, 10)
    with pytest.raises(ValueError, match="rank"):
        snap(-1, 16, 10)
    with pytest.raises(ValueError, match="full"):
        rank_grid(0, 16)


def test_rank_grid_examples():
    assert rank_grid(40, 16) == [16, 32, 40]
    assert rank_grid(64, 16) == [16, 32, 48, 64]
    assert rank_grid(10, 16) == [10]
    assert rank_grid(16, 16) == [16]
    assert rank_grid(4, 1) == [1, 2, 3, 4]


@HYP
@given(full=st.integers(1, 2048), multiple=st.integers(1, 64))
def test_rank_grid_properties(full, multiple):
    grid = rank_grid(full, multiple)
    assert grid[-1] == full and len(grid) == math.ceil(full / multiple)
    assert all(r % multiple == 0 and r < full for r in grid[:-1])
    assert all(a < b for a, b in itertools.pairwise(grid))
    assert all(snap(r, multiple, full) == r for r in grid[:-1])


# --- error curves --------------------------------------------------------------------------------


def truncated_svd_rel_error(matrix: np.ndarray, rank: int) -> float:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return float(np.sum((matrix - approx) ** 2) / np.sum(matrix**2))


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (17, 17)])
def test_svd_error_curve_equals_truncated_svd(shape):
    w = np.random.default_rng(1).standard_normal(shape) @ np.diag(0.8 ** np.arange(shape[1]))
    ranks = list(range(min(shape) + 2))
    curve = svd_error_curve((singular_values(w),), ranks)
    expected = [truncated_svd_rel_error(w, r) for r in ranks]
    np.testing.assert_allclose(curve, expected, rtol=1e-9, atol=1e-12)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == 0.0
    assert np.all(np.diff(curve) <= 0)


def test_svd_error_curve_pools_groups():
    rng = np.random.default_rng(2)
    groups = [rng.standard_normal((12, 20)) * scale for scale in (1.0, 3.0, 0.1)]
    ranks = [0, 1, 4, 8, 12]
    curve = svd_error_curve(tuple(singular_values(g) for g in groups), ranks)
    total = sum(np.sum(g**2) for g in groups)
    for r, value in zip(ranks, curve):
        dropped = sum(truncated_svd_rel_error(g, r) * np.sum(g**2) for g in groups)
        assert value == pytest.approx(dropped / total, rel=1e-9, abs=1e-12)
    np.testing.assert_array_equal(svd_error_curve((np.zeros(3),), [0, 1]), [0.0, 0.0])


def hosvd_rel_error(kernel: np.ndarray, rt: int, rs: int) -> float:
    t, s = kernel.shape[:2]
    ut = np.linalg.svd(kernel.reshape(t, -1), full_matrices=False)[0][:, :rt]
    us = np.linalg.svd(kernel.transpose(1, 0, 2, 3).reshape(s, -1), full_matrices=False)[0][:, :rs]
    approx = np.einsum("ta,ua,sb,vb,uvxy->tsxy", ut, ut, us, us, kernel)
    return float(np.sum((kernel - approx) ** 2) / np.sum(kernel**2))


def test_tucker_error_curve_bounds_hosvd():
    kernel = np.random.default_rng(3).standard_normal((12, 10, 3, 3))
    kernel *= np.exp(-0.3 * np.arange(12))[:, None, None, None]
    mode_t = singular_values(kernel.reshape(12, -1))
    mode_s = singular_values(kernel.transpose(1, 0, 2, 3).reshape(10, -1))
    pairs = [(rt, rs) for rt in (0, 1, 4, 8, 12) for rs in (0, 2, 5, 10)]
    bound = tucker_error_curve((mode_t,), (mode_s,), pairs)
    actual = np.array([hosvd_rel_error(kernel, rt, rs) for rt, rs in pairs])
    assert np.all(actual <= bound + 1e-9)
    assert np.all((bound >= 0) & (bound <= 1))
    assert bound[pairs.index((12, 10))] == pytest.approx(0.0, abs=1e-12)
    assert bound[pairs.index((0, 0))] == 1.0  # clipped from 2
    # One mode at full rank: the bound is that of the other mode's truncated SVD.
    np.testing.assert_allclose(tucker_error_curve(mode_t, mode_s, [(12, 5), (4, 10)]),
                               [svd_error_curve(mode_s, [5])[0], svd_error_curve(mode_t, [4])[0]],
                               rtol=1e-9)


# --- allocator -----------------------------------------------------------------------------------


def brute_force(layers, budget):
    """The least total error over every combination with cost <= budget (inf if none fits)."""
    best = math.inf
    for combo in itertools.product(*[[None, *layer.options] for layer in layers]):
        cost = sum(layer.dense_cost if o is None else o.cost for layer, o in zip(layers, combo))
        error = sum(0.0 if o is None else o.error for o in combo)
        if cost <= budget and error < best:
            best = error
    return best


def lagrangian_configurations(layers):
    """Every configuration minimising Σ error + λ Σ cost for some λ >= 0, as (cost, error).

    Per layer the minimiser changes only at the slopes between two of its points, so λ is
    taken at 0, between consecutive critical slopes, and past the last one.
    """
    points = [[(layer.dense_cost, 0.0)] + [(o.cost, o.error) for o in layer.options
                                           if o.cost < layer.dense_cost] for layer in layers]
    slopes = sorted({abs((e2 - e1) / (c1 - c2)) for pts in points
                     for (c1, e1), (c2, e2) in itertools.combinations(pts, 2) if c1 != c2})
    middles = [(a + b) / 2 for a, b in itertools.pairwise(slopes)]
    lambdas = [0.0, *middles, 2 * max(slopes, default=0.0) + 1]
    configs = []
    for lam in lambdas:
        chosen = [min(pts, key=lambda p: (p[1] + lam * p[0], p[0])) for pts in points]
        configs.append((sum(c for c, _ in chosen), sum(e for _, e in chosen)))
    return configs


def check_allocation(layers, budget, result: Allocation):
    assert set(result.choices) == {layer.name for layer in layers}
    cost = sum(layer.dense_cost if result.choices[layer.name] is None
               else result.choices[layer.name].cost for layer in layers)
    error = sum(0.0 if o is None else o.error for o in result.choices.values())
    assert result.cost == pytest.approx(cost) and result.error == pytest.approx(error)
    lowest = sum(min([layer.dense_cost] + [o.cost for o in layer.options]) for layer in layers)
    assert result.lowest_cost == pytest.approx(lowest)
    assert all(o is None or o.cost < layer.dense_cost
               for layer, o in zip(layers, result.choices.values()))
    return cost, error


@st.composite
def instances(draw, max_layers=4, max_options=4):
    n = draw(st.integers(1, max_layers))
    layers = []
    for i in range(n):
        dense = draw(st.integers(1, 40))
        options = [Option(float(draw(st.integers(0, 45))), draw(st.floats(0, 1)), (i, k))
                   for k in range(draw(st.integers(0, max_options)))]
        layers.append(LayerOptions(f"layer{i}", float(dense), options))
    total = sum(layer.dense_cost for layer in layers)
    budget = draw(st.floats(-1, total + 5))
    return layers, budget


@HYP
@given(instance=instances())
def test_allocate_against_brute_force(instance):
    layers, budget = instance
    result = allocate(layers, budget)
    cost, error = check_allocation(layers, budget, result)
    optimum = brute_force(layers, budget)
    if math.isinf(optimum):
        assert not result.feasible and result.cost == pytest.approx(result.lowest_cost)
        assert result.lowest_cost > budget
        return
    assert result.feasible and cost <= budget
    assert error >= optimum - EXACT
    # Never worse than any Lagrangian-optimal configuration that fits; those are exact optima
    # for their own cost, which is where the hull greedy is exactly optimal.
    configurations = lagrangian_configurations(layers)
    assert error <= min(e for c, e in configurations if c <= budget) + EXACT
    # With the budget at such a configuration's cost, the allocator is exactly optimal.
    for c, _ in configurations[::3]:
        assert allocate(layers, c).error == pytest.approx(brute_force(layers, c), abs=EXACT)


@st.composite
def convex_instances(draw):
    """Every layer saves `unit` per step with convex (increasing) error increments."""
    unit = draw(st.sampled_from([1.0, 3.0, 16.0]))
    layers = []
    for i in range(draw(st.integers(1, 4))):
        steps = draw(st.integers(0, 4))
        increments = sorted(draw(st.lists(st.floats(0, 1), min_size=steps, max_size=steps)))
        dense = unit * (steps + draw(st.integers(0, 3)))
        errors = np.cumsum(increments)
        layers.append(LayerOptions(f"layer{i}", dense, [
            Option(dense - unit * (k + 1), float(errors[k])) for k in range(steps)]))
    total = sum(layer.dense_cost for layer in layers)
    return layers, draw(st.floats(0, total))


@HYP
@given(instance=convex_instances())
def test_allocate_is_exact_on_convex_unit_step_instances(instance):
    layers, budget = instance
    result = allocate(layers, budget)
    check_allocation(layers, budget, result)
    optimum = brute_force(layers, budget)
    if math.isinf(optimum):
        assert not result.feasible
    else:
        assert result.feasible and result.cost <= budget
        assert result.error == pytest.approx(optimum, abs=EXACT)


def test_allocate_mostly_exact_on_random_instances():
    rng = np.random.default_rng(0)
    exact = trials = 0
    for _ in range(200):
        layers = [LayerOptions(f"l{i}", float(rng.integers(10, 60)),
                               [Option(float(rng.integers(0, 60)), float(rng.random()))
                                for _ in range(rng.integers(1, 5))])
                  for i in range(rng.integers(2, 5))]
        budget = float(rng.uniform(0, sum(layer.dense_cost for layer in layers)))
        optimum = brute_force(layers, budget)
        if math.isinf(optimum):
            continue
        trials += 1
        exact += allocate(layers, budget).error <= optimum + EXACT
    assert exact >= 0.95 * trials


def test_allocate_compresses_the_flatter_layer_more():
    """A near-low-rank layer loses little per rank dropped, so it takes most of the saving."""
    rng = np.random.default_rng(4)
    n = 64
    low = rng.standard_normal((n, 8)) @ rng.standard_normal((8, n))
    low += 0.05 * rng.standard_normal((n, n))
    full = rng.standard_normal((n, n))
    layers, ranks = [], {}
    for name, w in (("full_rank", full), ("low_rank", low)):
        grid = rank_grid(n, 4)
        errors = svd_error_curve((singular_values(w),), grid)
        layers.append(LayerOptions(name, float(n * n), [
            Option(float(r * 2 * n), float(e), r) for r, e in zip(grid, errors)]))
    result = allocate(layers, 0.5 * 2 * n * n)
    assert result.feasible and result.cost <= n * n
    for name, option in result.choices.items():
        ranks[name] = n if option is None else option.payload
    assert ranks["low_rank"] < ranks["full_rank"]
    assert ranks["low_rank"] <= 12


def test_allocate_dense_when_budget_allows_and_infeasible_when_not():
    layers = [LayerOptions("a", 100.0, [Option(60.0, 0.1), Option(30.0, 0.5)]),
              LayerOptions("b", 50.0, [Option(40.0, 0.2)]),
              LayerOptions("c", 20.0)]
    roomy = allocate(layers, 170.0)
    assert roomy.feasible and roomy.error == 0 and all(o is None for o in roomy.choices.values())
    impossible = allocate(layers, 89.0)
    assert not impossible.feasible
    assert impossible.lowest_cost == 90.0 == impossible.cost
    assert impossible.choices == {"a": layers[0].options[1], "b": layers[1].options[0], "c": None}
    assert allocate(layers, 90.0).feasible


def test_allocate_never_picks_options_dearer_than_dense():
    layers = [LayerOptions("a", 10.0, [Option(10.0, 0.0), Option(12.0, 0.0), Option(5.0, 0.3)]),
              LayerOptions("b", 10.0, [Option(11.0, 0.0)])]
    assert allocate(layers, 20.0).choices == {"a": None, "b": None}
    result = allocate(layers, 15.0)
    assert result.choices == {"a": layers[0].options[2], "b": None}
    assert not allocate(layers, 14.0).feasible


def test_allocate_ties_go_to_the_earlier_layer_and_payloads_pass_through():
    payload = object()
    layers = [LayerOptions(name, 10.0, [Option(5.0, 0.5, payload)]) for name in ("x", "y", "z")]
    result = allocate(layers, 25.0)
    assert result.choices["x"].payload is payload
    assert result.choices["y"] is None and result.choices["z"] is None
    assert allocate(layers, 25.0) == result


def test_allocate_fixes_an_overshooting_greedy_move():
    # Greedy takes "a" (slope 0.1) and overshoots by 7; saving 3 through "b" is better.
    layers = [LayerOptions("a", 10.0, [Option(0.0, 1.0)]),
              LayerOptions("b", 3.0, [Option(0.0, 0.5)])]
    result = allocate(layers, 10.0)
    assert result.choices == {"a": None, "b": layers[1].options[0]} and result.error == 0.5


def test_allocate_rejects_bad_input():
    with pytest.raises(ValueError, match="unique"):
        allocate([LayerOptions("a", 1.0), LayerOptions("a", 1.0)], 1.0)
    with pytest.raises(ValueError, match="'a'.*error"):
        allocate([LayerOptions("a", 1.0, [Option(0.5, -1.0)])], 1.0)
    with pytest.raises(ValueError, match="dense_cost"):
        allocate([LayerOptions("a", math.inf)], 1.0)


def test_allocate_is_fast():
    rng = np.random.default_rng(5)
    layers = []
    for i in range(300):
        dense = float(rng.integers(10_000, 10_000_000))
        costs = np.sort(rng.uniform(0, 1.1 * dense, 64))
        errors = np.sort(rng.random(64))[::-1]
        options = [Option(float(c), float(e), k) for k, (c, e) in enumerate(zip(costs, errors))]
        layers.append(LayerOptions(f"l{i}", dense, options))
    total = sum(layer.dense_cost for layer in layers)
    start = time.perf_counter()
    results = [allocate(layers, fraction * total) for fraction in (0.3, 0.6, 0.9)]
    elapsed = time.perf_counter() - start
    assert all(r.feasible for r in results)
    assert results[0].error >= results[1].error >= results[2].error
    assert elapsed < 1.0  # three allocations; one takes a few tens of milliseconds
