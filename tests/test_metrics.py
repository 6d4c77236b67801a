"""Tests for onnx_lowrank.metrics: known answers computed by hand."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.errors import InputError
from onnx_lowrank.metrics import (
    BUILTIN_METRICS,
    classifier_top1,
    ctc_agreement,
    detection_f1,
    load_metric,
    text_boxes,
    textmap_f1,
)
from onnx_lowrank.metrics import _regions

# ------------------------------------------------------------------ top-1


def test_top1_agreement_counts_rows_over_batches():
    a1 = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    b1 = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])  # row 2 differs
    a2 = np.array([[0.0, 0.0, 1.0]])
    b2 = np.array([[0.0, 0.1, 0.9]])
    original = [
        {"feat": np.zeros((2, 4, 4)), "logits": a1},
        {"feat": np.zeros((1, 4, 4)), "logits": a2},
    ]
    candidate = [
        {"feat": np.zeros((2, 4, 4)), "logits": b1},
        {"feat": np.zeros((1, 4, 4)), "logits": b2},
    ]
    assert classifier_top1(original, candidate) == pytest.approx(2 / 3)
    assert classifier_top1(original[:1], original[:1]) == 1.0


def test_top1_errors():
    with pytest.raises(InputError, match="no output of the expected shape"):
        classifier_top1([{"y": np.zeros(3)}], [{"y": np.zeros(3)}])
    with pytest.raises(InputError, match="candidate has no output 'y'"):
        classifier_top1([{"y": np.zeros((1, 3))}], [{"z": np.zeros((1, 3))}])
    with pytest.raises(InputError, match="shape"):
        classifier_top1([{"y": np.zeros((1, 3))}], [{"y": np.zeros((1, 4))}])


# ------------------------------------------------------------------ detection


def _v8(boxes, nc=2, anchors=8):
    """A YOLOv8 raw output [1, 4+nc, A] from (cx, cy, w, h, class, score) tuples."""
    out = np.zeros((1, 4 + nc, anchors), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    return out


def _v5(boxes, nc=2, anchors=9):
    """A YOLOv5 raw output [1, A, 5+nc] from (cx, cy, w, h, class, objectness, prob) tuples."""
    out = np.zeros((1, anchors, 5 + nc), np.float32)
    for i, (cx, cy, w, h, cls, obj, prob) in enumerate(boxes):
        out[0, i, :5] = (cx, cy, w, h, obj)
        out[0, i, 5 + cls] = prob
    return out


BOXES = [
    (50, 50, 20, 20, 0, 0.9),
    (150, 50, 30, 30, 1, 0.8),
    (50, 150, 20, 40, 0, 0.7),
]


def _f1(original, candidate, **kw):
    return detection_f1([{"pred": original}], [{"pred": candidate}], **kw)


def test_detection_identical_is_one():
    out = _v8(BOXES)
    assert _f1(out, out) == 1.0


def test_detection_one_box_moved_far():
    moved = list(BOXES)
    moved[1] = (400, 400, 30, 30, 1, 0.8)
    # TP = 2, FP = 1 (the moved box), FN = 1 (the original box it left): F1 = 4 / 6.
    assert _f1(_v8(BOXES), _v8(moved)) == pytest.approx(4 / 6)


def test_detection_class_change_does_not_match():
    changed = list(BOXES)
    changed[0] = (50, 50, 20, 20, 1, 0.9)
    assert _f1(_v8(BOXES), _v8(changed)) == pytest.approx(4 / 6)


def test_detection_small_shift_still_matches():
    shifted = [(cx + 2, cy, w, h, c, s) for cx, cy, w, h, c, s in BOXES]  # IoU >= 0.5
    assert _f1(_v8(BOXES), _v8(shifted)) == 1.0


def test_detection_threshold_and_nms():
    # A box under the 0.25 threshold is not a detection; an overlapping same-class box
    # (IoU 0.82 > 0.45) is suppressed; the same box in another class is kept.
    original = _v8([(50, 50, 20, 20, 0, 0.9)])
    candidate = _v8(
        [
            (50, 50, 20, 20, 0, 0.9),
            (51, 51, 20, 20, 0, 0.6),  # suppressed by NMS
            (300, 300, 20, 20, 0, 0.2),  # below the threshold
        ]
    )
    assert _f1(original, candidate) == 1.0
    candidate = _v8([(50, 50, 20, 20, 0, 0.9), (51, 51, 20, 20, 1, 0.6)])
    # The class-1 box survives per-class NMS: TP 1, FP 1, FN 0 -> 2 / 3.
    assert _f1(original, candidate) == pytest.approx(2 / 3)


def test_detection_both_empty_and_one_empty():
    empty = _v8([])
    assert _f1(empty, empty) == 1.0
    assert _f1(_v8(BOXES), empty) == 0.0


def test_detection_each_original_box_matched_once():
    original = _v8([(60, 60, 20, 20, 0, 0.9)])
    # The top and bottom parts of the original box: each has IoU 0.7 with it, but only
    # 0.4 with each other, so both survive NMS (<= 0.45) and only the better one matches.
    candidate = _v8([(60, 57, 20, 14, 0, 0.9), (60, 63, 20, 14, 0, 0.8)])
    # TP 1, FP 1, FN 0 -> 2 / 3.
    assert _f1(original, candidate) == pytest.approx(2 / 3)


def test_detection_yolov5_layout_with_objectness():
    boxes = [(50, 50, 20, 20, 0, 0.9, 0.9), (150, 50, 30, 30, 1, 0.9, 0.8)]
    original = _v5(boxes)
    assert original.shape == (1, 9, 7)  # anchors > channels: YOLOv5 layout
    assert _f1(original, original) == 1.0
    # Objectness 0.2 x prob 0.9 = 0.18 < 0.25: the second box is gone.
    weak = _v5([boxes[0], (150, 50, 30, 30, 1, 0.2, 0.9)])
    assert _f1(original, weak) == pytest.approx(2 / 3)
    # The layout can also be named.
    assert _f1(original, weak, layout="yolov5") == pytest.approx(2 / 3)


def test_detection_counts_over_images_and_batches():
    a = np.concatenate([_v8(BOXES), _v8(BOXES[:1])])
    moved = list(BOXES)
    moved[2] = (400, 400, 20, 40, 0, 0.7)
    b = np.concatenate([_v8(moved), _v8(BOXES[:1])])
    # Image 1: TP 2, FP 1, FN 1; image 2: TP 1. Batch 2 repeats image 2: TP 1.
    original = [{"pred": a}, {"pred": _v8(BOXES[:1])}]
    candidate = [{"pred": b}, {"pred": _v8(BOXES[:1])}]
    assert detection_f1(original, candidate) == pytest.approx(8 / 10)


def test_detection_errors():
    with pytest.raises(InputError, match="expected shape"):
        detection_f1([{"y": np.zeros((1, 3))}], [{"y": np.zeros((1, 3))}])
    with pytest.raises(InputError, match="channels per box"):
        detection_f1([{"y": np.zeros((1, 3, 10))}], [{"y": np.zeros((1, 3, 10))}])
    with pytest.raises(InputError, match="layout"):
        detection_f1([{"y": _v8(BOXES)}], [{"y": _v8(BOXES)}], layout="ssd")


# ------------------------------------------------------------------ CTC


def _logits(*paths, classes=4):
    """[N, T, C] one-hot logits following the given label paths."""
    return np.stack([np.eye(classes, dtype=np.float32)[list(p)] for p in paths])


def test_ctc_greedy_collapse_and_blank():
    reference = _logits([0, 1, 1, 0, 1, 2, 2], [3, 3, 3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0])
    candidate = _logits(
        [1, 1, 0, 1, 2, 0, 0],  # (1, 1, 2): same labels, other alignment
        [3, 0, 3, 0, 0, 0, 0],  # (3, 3): differs from (3,)
        [0, 0, 0, 0, 0, 0, 0],  # (): equal
    )
    assert ctc_agreement([{"logits": reference}], [{"logits": candidate}]) == pytest.approx(2 / 3)
    assert ctc_agreement([{"logits": reference}], [{"logits": reference}]) == 1.0


def test_ctc_time_major_and_blank_index():
    reference = _logits([0, 1, 1, 0, 1, 2, 2], [3, 3, 3, 0, 0, 0, 0])
    candidate = _logits([1, 0, 1, 1, 0, 2, 0], [3, 0, 0, 0, 0, 0, 0])
    outs = [{"o": reference.transpose(1, 0, 2)}], [{"o": candidate.transpose(1, 0, 2)}]
    assert ctc_agreement(*outs, time_major=True) == 1.0
    # With blank = 3 the second sequences decode to (0,) and (0,), the first ones differ.
    assert ctc_agreement(*outs, time_major=True, blank=3) == pytest.approx(1 / 2)


def test_ctc_errors():
    with pytest.raises(InputError, match="CTC"):
        ctc_agreement([{"o": np.zeros((1, 3))}], [{"o": np.zeros((1, 3))}])
    with pytest.raises(InputError, match="batches"):
        ctc_agreement([{"o": np.zeros((1, 3, 3))}], [])


# ------------------------------------------------------------------ text map (DBNet)


def _flood_regions(mask: np.ndarray) -> set[frozenset]:
    """8-connected regions by breadth-first flood fill: the reference for `_regions`."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = set()
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        todo, region = [start], set()
        seen[start] = True
        while todo:
            y, x = todo.pop()
            region.add((int(y), int(x)))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        todo.append((v, u))
        regions.add(frozenset(region))
    return regions


def _run_regions(mask: np.ndarray) -> set[frozenset]:
    label, rows, span = _regions(mask)
    found: dict[int, set] = {}
    for region, y, (x0, x1) in zip(label, rows, span, strict=True):
        found.setdefault(int(region), set()).update((int(y), x) for x in range(x0, x1 + 1))
    return {frozenset(r) for r in found.values()}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.floats(0.1, 0.9), st.integers(0, 2**31 - 1))
def test_regions_match_flood_fill(height, width, density, seed):
    mask = np.random.default_rng(seed).random((height, width)) < density
    assert _run_regions(mask) == _flood_regions(mask)


def test_regions_diagonal_touch_joins_and_gap_splits():
    mask = np.zeros((3, 7), dtype=bool)
    mask[0, 0:2] = True
    mask[1, 2] = True          # touches (0, 1) diagonally: same region
    mask[2, 4:7] = True        # one column away from (1, 2): a region of its own
    assert _run_regions(mask) == {frozenset({(0, 0), (0, 1), (1, 2)}), frozenset({(2, 4), (2, 5), (2, 6)})}
    assert len(_regions(np.zeros((4, 4), dtype=bool))[0]) == 0


def _text_map(shape=(40, 60), boxes=((5, 5, 30, 12, 0.9),)):
    prob = np.full(shape, 0.05, dtype=np.float32)
    for x0, y0, x1, y1, p in boxes:
        prob[y0:y1, x0:x1] = p
    return prob


def test_text_boxes_thresholds_and_scores():
    prob = _text_map(boxes=((5, 5, 30, 12, 0.9), (40, 20, 50, 30, 0.5), (2, 30, 5, 38, 0.95)))
    boxes, scores = text_boxes(prob)
    # the 0.5 region scores below the box threshold 0.6; the 3-pixel-wide one spans 2 between
    # pixel centres, below the min side 3 (PaddleOCR's minAreaRect measure)
    np.testing.assert_allclose(boxes, [[5, 5, 30, 12]])
    np.testing.assert_allclose(scores, [0.9], rtol=1e-6)
    assert len(text_boxes(prob, box_threshold=0.4)[0]) == 2
    assert len(text_boxes(prob, min_side=2)[0]) == 2


def test_text_boxes_ignore_non_finite_pixels_outside_regions():
    prob = _text_map(boxes=((2, 2, 8, 6, 0.9), (12, 2, 18, 6, 0.9)))
    for bad in (np.nan, -np.inf):       # not text, left of and between the two regions
        spoiled = prob.copy()
        spoiled[3, [0, 10]] = bad
        assert len(text_boxes(spoiled)[0]) == 2


def test_textmap_f1_known_answers():
    two = _text_map(boxes=((5, 5, 30, 12, 0.9), (5, 20, 40, 28, 0.8)))
    one = _text_map(boxes=((5, 5, 30, 12, 0.9),))
    shifted = _text_map(boxes=((6, 5, 31, 12, 0.9), (5, 20, 40, 28, 0.8)))
    empty = _text_map(boxes=())
    speck = _text_map(boxes=((50, 30, 52, 32, 0.4),))     # stray pixels the post-processing drops
    batch = lambda *maps: [{"maps": np.stack(maps)[:, None]}]
    assert textmap_f1(batch(two), batch(two)) == 1.0
    assert textmap_f1(batch(two), batch(one)) == pytest.approx(2 / 3)     # TP 1, FN 1
    assert textmap_f1(batch(two), batch(shifted)) == 1.0                 # IoU 0.92 still matches
    assert textmap_f1(batch(empty), batch(speck)) == 1.0                 # no boxes on either side
    assert textmap_f1(batch(empty), batch(one)) == 0.0                   # FP only
    # counted over images and batches, [N, H, W] too: TP 1 + 1 + 2, FN 1 -> 8 / 9
    assert textmap_f1([{"m": np.stack([two, one])}, {"m": two[None]}],
                      [{"m": np.stack([one, one])}, {"m": two[None]}]) == pytest.approx(8 / 9)


def test_textmap_errors():
    with pytest.raises(InputError, match="probability map"):
        textmap_f1([{"y": np.zeros((1, 3, 4, 4))}], [{"y": np.zeros((1, 3, 4, 4))}])
    with pytest.raises(InputError, match="shape"):
        textmap_f1([{"y": np.zeros((1, 1, 4, 4))}], [{"y": np.zeros((1, 1, 4, 5))}])
    with pytest.raises(InputError, match="shape"):
        textmap_f1([{"y": np.zeros((1, 1, 0, 8))}], [{"y": np.zeros((1, 1, 0, 8))}])
    assert load_metric("textmap") is textmap_f1


# ------------------------------------------------------------------ load_metric


def test_load_metric_builtin_and_import(tmp_path):
    assert load_metric("top1") is classifier_top1
    assert load_metric("detection") is detection_f1
    assert load_metric("ctc") is ctc_agreement
    assert set(BUILTIN_METRICS) == {"top1", "detection", "ctc", "textmap"}
    assert load_metric("onnx_lowrank.metrics:ctc_agreement") is ctc_agreement
    assert load_metric(len) is len
    script = tmp_path / "my_metric.py"
    script.write_text("def score(a, b):\n    return 0.5\n")
    assert load_metric(f"{script}:score")([], []) == 0.5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import metric module 'no_such_module_xyz'"),
        ("math:no_such_function", "has no attribute 'no_such_function'"),
        ("math:pi", "expected a callable"),
        ("accuracy", "unknown metric 'accuracy'"),
        ("/nonexistent/file.py:f", "file.py: no such file"),
    ],
)
def test_load_metric_errors(spec, message):
    with pytest.raises(InputError, match=message):
        load_metric(spec)


def test_load_metric_module_raising_on_import(tmp_path):
    script = tmp_path / "broken_metric.py"
    script.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InputError, match="RuntimeError: boom"):
        load_metric(f"{script}:f")


def test_validation_and_the_top1_metric_read_the_same_output_by_one_rule():
    from onnx_lowrank.compare import _Top1Counter

    rng = np.random.default_rng(3)
    original = {"features": rng.standard_normal((6, 1)), "sequence": rng.standard_normal((6, 4, 7)),
                "probs": rng.standard_normal((6, 5))}
    candidate = {name: value + 0.8 * rng.standard_normal(value.shape) for name, value in original.items()}
    counter = _Top1Counter(original)
    counter.add(original, candidate)
    assert counter.name == "probs"
    assert counter.result() == classifier_top1([original], [candidate])
    # No [N, classes] output: neither reads the per-step [N, T, C] one as if it were.
    sequence_only = {"sequence": original["sequence"]}
    assert _Top1Counter(sequence_only).result() is None
    with pytest.raises(InputError, match="no output of the expected shape"):
        classifier_top1([sequence_only], [sequence_only])
