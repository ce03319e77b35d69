"""detection.boxes: IoU, encode/decode and NMS against hand-computed cases, plus properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detection import boxes
from errors import UserError

_SETTINGS = settings(max_examples=30, deadline=None)


def test_iou_hand_computed():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], np.float32)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    want = np.array(
        [
            [25 / 175, 1.0, 0.0, 0.5],  # corner overlap 5x5; itself; apart; half of it
            [0.0, 4 / 100, 0.0, 4 / 50],
        ]
    )
    np.testing.assert_allclose(boxes.iou(a, b), want, rtol=1e-6)
    # the same in JAX, under jit
    np.testing.assert_allclose(jax.jit(boxes.iou)(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-6)


def test_iou_of_empty_boxes_is_zero():
    a = np.array([[3, 3, 3, 3]], np.float32)
    assert boxes.iou(a, a)[0, 0] == 0.0


def test_encode_hand_computed_and_decode_inverts_it():
    p = np.array([[0, 0, 10, 20]], np.float32)  # centre (5, 10), 10 x 20
    g = np.array([[5, 0, 25, 10]], np.float32)  # centre (15, 5), 20 x 10
    t = boxes.encode(p, g)
    np.testing.assert_allclose(t, [[1.0, -0.25, np.log(2.0), np.log(0.5)]], rtol=1e-6)
    np.testing.assert_allclose(boxes.decode(p, t), g, atol=1e-5)
    jt = jax.jit(boxes.encode)(jnp.asarray(p), jnp.asarray(g))  # the same in JAX
    np.testing.assert_allclose(jt, t, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(boxes.decode)(jnp.asarray(p), jt), g, atol=1e-5)


_coord = st.floats(0, 100, allow_nan=False, width=32)
_size = st.floats(1, 60, allow_nan=False, width=32)


@_SETTINGS
@given(st.lists(st.tuples(_coord, _coord, _size, _size), min_size=1, max_size=8), st.data())
def test_decode_of_encode_is_the_identity(props, data):
    p = np.array([[x, y, x + w, y + h] for x, y, w, h in props], np.float32)
    g = p[np.array(data.draw(st.permutations(range(len(p)))))] + 3.0
    np.testing.assert_allclose(boxes.decode(p, boxes.encode(p, g)), g, rtol=1e-4, atol=1e-3)


def test_nms_hand_computed():
    b = np.array(
        [
            [0, 0, 10, 10],  # 0: score .9, kept
            [1, 0, 11, 10],  # 1: IoU 9/11 with 0 -> suppressed
            [20, 20, 30, 30],  # 2: apart, kept
            [0, 0, 10, 10],  # 3: same box as 0 but another class -> kept
            [0, 5, 10, 15],  # 4: IoU 1/3 with 0: kept at threshold .5, not at .3
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.95, 0.5, 0.3, 0.8])
    classes = np.array([0, 0, 0, 1, 0])
    # 1 has the highest score and suppresses 0 (IoU 9/11); 4 vs 1: IoU 45/155 = 0.29
    assert boxes.nms(b, scores, classes, threshold=0.5).tolist() == [1, 4, 2, 3]
    # 0.29 < 0.3: 4 still survives; below it, 1 suppresses 4
    assert boxes.nms(b, scores, classes, threshold=0.3).tolist() == [1, 4, 2, 3]
    assert boxes.nms(b, scores, classes, threshold=0.25).tolist() == [1, 2, 3]
    # one class: 3 (== 0, IoU 9/11 with 1) goes too
    assert boxes.nms(b, scores, threshold=0.5).tolist() == [1, 4, 2]


def test_nms_classes_never_suppress_each_other_and_ties_keep_input_order():
    # the same box in two classes at negative coordinates: OpenCV's per-class offset alone
    # would make them overlap (its offset assumes coordinates >= 0)
    b = np.array([[-50, -50, -40, -40], [-50, -50, -40, -40], [-49, -50, -39, -40]], np.float32)
    assert boxes.nms(b, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 0])).tolist() == [0, 1]
    # equal scores: the earlier box wins
    assert boxes.nms(b[[0, 2]], np.array([0.5, 0.5]), threshold=0.3).tolist() == [0]
    assert boxes.nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


@_SETTINGS
@given(
    st.lists(
        st.tuples(_coord, _coord, _size, _size, st.floats(0, 1), st.integers(0, 2)),
        min_size=1,
        max_size=20,
    ),
    st.floats(0.1, 0.9),
)
def test_nms_properties(rows, threshold):
    b = np.array([[x, y, x + w, y + h] for x, y, w, h, _, _ in rows], np.float32)
    s = np.array([r[4] for r in rows], np.float32)
    c = np.array([r[5] for r in rows])
    kept = boxes.nms(b, s, c, threshold=threshold)
    # the highest score is always kept
    assert s[kept[0]] == s.max()
    # kept boxes of one class pairwise at most the threshold
    overlaps = boxes.iou(b[kept], b[kept])
    same = c[kept][:, None] == c[kept][None, :]
    np.fill_diagonal(same, False)
    assert (overlaps[same] <= threshold + 1e-6).all()
    # every dropped box is covered by a kept box of its class with a score at least its own
    for i in set(range(len(b))) - set(kept.tolist()):
        cover = (c[kept] == c[i]) & (boxes.iou(b[i : i + 1], b[kept])[0] > threshold)
        assert (cover & (s[kept] >= s[i])).any()


def test_check_boxes_errors():
    ok = boxes.check_boxes([[0, 0, 4, 4]], height=4, width=4)
    assert ok.shape == (1, 4)
    with pytest.raises(UserError, match=r"boxes\[1\].*is empty"):
        boxes.check_boxes([[0, 0, 4, 4], [3, 0, 2, 4]], height=8, width=8)
    with pytest.raises(UserError, match="outside the 8x8 image"):
        boxes.check_boxes([[0, 0, 9, 4]], height=8, width=8)
    with pytest.raises(UserError, match="NaN"):
        boxes.check_boxes([[0, np.nan, 2, 4]], height=8, width=8)
    assert boxes.check_boxes(np.zeros((0, 4)), height=8, width=8).shape == (0, 4)
