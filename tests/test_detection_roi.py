"""models.roi (RoI max pooling, Fast R-CNN) against a NumPy loop, its gradient, its layer kind."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import UserError
from models import roi, summary
from models.builder import Builder


def _reference(features, boxes, batch_index, out_h, out_w, scale):
    """The Caffe layer's loops (continuous box convention), in NumPy; also the argmax of
    each output, for the gradient."""
    _, height, width, channels = features.shape
    out = np.zeros((len(boxes), out_h, out_w, channels), np.float32)
    grad_to = {}
    for r, (box, b) in enumerate(zip(boxes, batch_index, strict=True)):
        x1, y1, x2, y2 = (math.floor(v * scale + 0.5) for v in box)
        bin_h, bin_w = max(y2 - y1, 1) / out_h, max(x2 - x1, 1) / out_w
        for i in range(out_h):
            for j in range(out_w):
                hs = min(max(math.floor(i * bin_h) + y1, 0), height)
                he = min(max(math.ceil((i + 1) * bin_h) + y1, 0), height)
                ws = min(max(math.floor(j * bin_w) + x1, 0), width)
                we = min(max(math.ceil((j + 1) * bin_w) + x1, 0), width)
                if he <= hs or we <= ws:
                    continue  # empty bin: 0
                window = features[b, hs:he, ws:we]
                out[r, i, j] = window.max(axis=(0, 1))
                for c in range(channels):
                    k = np.argmax(window[..., c])
                    grad_to[r, i, j, c] = (b, hs + k // (we - ws), ws + k % (we - ws), c)
    return out, grad_to


_BOXES = np.array(
    [
        [0, 0, 32, 32],  # the whole image
        [3.2, 5.1, 20.7, 14.0],  # inside, fractional
        [10, 10, 12, 11],  # smaller than the grid: bins repeat cells
        [24, -6, 48, 10],  # partly outside the map
        [40, 40, 60, 60],  # wholly outside: all bins empty, zeros
        [5, 9, 5.5, 9.5],  # rounds to an empty box: size 1 cell
    ],
    np.float32,
)


@pytest.mark.parametrize("out", [(2, 2), (3, 2), (7, 7)])
def test_roi_max_pool_matches_the_numpy_loop(out):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    batch_index = np.array([0, 1, 0, 1, 0, 1])
    scale = 1 / 4  # a stride-4 feature map of a 32x32 image
    want, _ = _reference(features, _BOXES, batch_index, *out, scale)
    got = jax.jit(roi.roi_max_pool, static_argnums=3, static_argnames="spatial_scale")(
        features, _BOXES, batch_index, out, spatial_scale=scale
    )
    assert got.shape == (6, *out, 3)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert (np.asarray(got[4]) == 0).all()


def test_roi_max_pool_matches_the_numpy_loop_on_random_boxes():
    # boxes of every size up to beyond the map: every level of the range-max table is read,
    # and bins of 1 to 12 cells
    rng = np.random.default_rng(3)
    features = rng.normal(size=(3, 14, 13, 4)).astype(np.float32)
    corner = rng.uniform(-40, 200, size=(64, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(1, 260, size=(64, 2))], 1)
    batch_index = rng.integers(0, 3, 64)
    want, _ = _reference(features, boxes.astype(np.float32), batch_index, 7, 5, 1 / 16)
    got = roi.roi_max_pool(features, boxes, batch_index, (7, 5), spatial_scale=1 / 16)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_roi_max_pool_gradient_goes_to_each_bins_maximum():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    batch_index = np.array([0, 1, 0, 1, 0, 1])
    upstream = rng.normal(size=(6, 3, 2, 3)).astype(np.float32)
    _, grad_to = _reference(features, _BOXES, batch_index, 3, 2, 0.25)
    want = np.zeros_like(features)
    for (r, i, j, c), where in grad_to.items():
        want[where] += upstream[r, i, j, c]

    def loss(f):
        pooled = roi.roi_max_pool(f, _BOXES, batch_index, (3, 2), spatial_scale=0.25)
        return jnp.sum(pooled * upstream)

    np.testing.assert_allclose(np.asarray(jax.grad(loss)(jnp.asarray(features))), want, atol=1e-6)


def test_roi_max_pool_gradient_of_a_tied_maximum_goes_to_one_cell():
    """Where several cells of a bin hold its maximum, the whole gradient goes to the first of
    them (along W, then H: the bin's top-left one here), none is lost or doubled."""
    features = np.zeros((1, 8, 8, 2), np.float32)
    features[0, 2:6, 1:5] = 3.0  # a 4 x 4 plateau
    boxes = np.array([[1, 2, 5, 6], [0, 0, 8, 8]], np.float32)  # the plateau; the whole map

    def loss(f):
        pooled = roi.roi_max_pool(f, boxes, np.array([0, 0]), (1, 1), inside=True)
        return jnp.sum(pooled * jnp.array([1.0, 10.0])[:, None, None, None])

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(features)))
    want = np.zeros_like(features)
    want[0, 2, 1] = 11.0  # both RoIs' maxima: the plateau's first cell
    np.testing.assert_array_equal(grad, want)


def test_whole_map_is_adaptive_max_pooling():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(2, 5, 7, 3)).astype(np.float32)
    got = np.asarray(roi.whole_map_pool(jnp.asarray(x), (3, 4), "max"))
    ref = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), (3, 4))
    np.testing.assert_array_equal(got, ref.permute(0, 2, 3, 1).numpy())


def test_roi_pool_layer_spec_and_summary_row():
    b = Builder((32, 32, 3))
    b.conv("conv", 8, 3, 2, 1)  # 16x16x8, jump 2
    b.roi_pool("roi", (4, 2))
    (_, spec) = b.specs
    assert spec.out_shape == (4, 2, 8) and spec.params == 0 and spec.jump == 2
    assert spec.flops == 16 * 16 * 8
    row = next(line for line in summary.format_table(b.specs).splitlines() if "roi_pool" in line)
    assert "roi_pool 4x2" in row and "per region, spatial scale 1/2" in row
    with pytest.raises(UserError, match="RoI pooling grid"):
        Builder((8, 8, 3)).roi_pool("roi", 0)
    with pytest.raises(UserError, match="needs a 3-D input"):
        b.flatten("flat")
        b.roi_pool("roi2", 2)


def test_inside_clips_to_the_map_and_builds_fewer_levels_with_the_same_result():
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.standard_normal((2, 24, 24, 5)), jnp.float32)
    xy = rng.uniform(-10, 90, (40, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(1, 60, (40, 2))], 1), jnp.float32)
    index = jnp.asarray(rng.integers(0, 2, 40), jnp.int32)
    clipped = jnp.clip(boxes, 0.0, 96.0)  # the map's extent in pixels at scale 1/4
    for size in (3, 7):
        fast = roi.roi_max_pool(features, boxes, index, size, spatial_scale=0.25, inside=True)
        full = roi.roi_max_pool(features, clipped, index, size, spatial_scale=0.25)
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(full))
    assert len(roi.range_max_table(features, axis=2, longest=5)) == 3  # 1, 2, 4 cells
    assert len(roi.range_max_table(features, axis=2)) == 5  # up to 16 of 24


def _align_reference(features, boxes, batch_index, out_h, out_w, scale, samples=2):
    """RoIAlign with max over the bilinear samples of each bin, as loops in NumPy."""
    _, height, width, channels = features.shape
    out = np.full((len(boxes), out_h, out_w, channels), -np.inf, np.float32)

    def value(image, y, x):
        y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
        y0, x0 = math.floor(y), math.floor(x)
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        fy, fx = y - y0, x - x0
        f = features[image]
        top = f[y0, x0] * (1 - fx) + f[y0, x1] * fx
        bottom = f[y1, x0] * (1 - fx) + f[y1, x1] * fx
        return top * (1 - fy) + bottom * fy

    for r, (box, b) in enumerate(zip(boxes, batch_index, strict=True)):
        x1, y1, x2, y2 = (v * scale for v in box)
        bin_h, bin_w = (y2 - y1) / out_h, (x2 - x1) / out_w
        for i in range(out_h):
            for j in range(out_w):
                for sy in range(samples):
                    for sx in range(samples):
                        y = y1 + bin_h * (i + (sy + 0.5) / samples) - 0.5
                        x = x1 + bin_w * (j + (sx + 0.5) / samples) - 0.5
                        out[r, i, j] = np.maximum(out[r, i, j], value(b, y, x))
    return out


def test_roi_align_matches_the_numpy_loop_on_random_boxes():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(3, 14, 13, 4)).astype(np.float32)
    corner = rng.uniform(-10, 150, size=(40, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0, 120, size=(40, 2))], 1)
    batch_index = rng.integers(0, 3, 40)
    want = _align_reference(features, boxes, batch_index, 3, 5, 1 / 8)
    got = jax.jit(roi.roi_align, static_argnums=3, static_argnames="spatial_scale")(
        features, boxes.astype(np.float32), batch_index, (3, 5), spatial_scale=1 / 8
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_roi_align_does_not_round_a_box_to_cells():
    # a map whose value is the column index: bilinear sampling reads positions exactly. Box
    # x 1..9 at scale 1/2 -> 0.5..4.5 cells, 2 bins of 2 cells, samples at 1.0, 2.0 | 3.0, 4.0
    # (minus the half-cell offset of cell centres): each bin's max 1.5 and 3.5
    column = np.broadcast_to(np.arange(8, dtype=np.float32)[None, :, None], (6, 8, 1))
    got = roi.roi_align(column[None], np.array([[1, 0, 9, 12]], np.float32), [0], (1, 2),
                        spatial_scale=0.5)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got)[0, 0, :, 0], [1.5, 3.5])
    # RoI max pooling rounds the same box to cells 1..5 (edges floor(0.5 + 0.5), floor(5)):
    # bins [1, 3) and [3, 5), maxima 2 and 4
    pooled = roi.roi_max_pool(column[None], np.array([[1, 0, 9, 12]], np.float32), [0], (1, 2),
                              spatial_scale=0.5)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(pooled)[0, 0, :, 0], [2, 4])


def test_roi_align_gradient_matches_finite_differences():
    from jax.test_util import check_grads

    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    boxes = jnp.array([[3, 5, 27, 30], [0, 0, 32, 32], [10, 2, 19, 13]], jnp.float32)
    pool = lambda f: roi.roi_align(f, boxes, jnp.array([0, 1, 1]), (3, 2), spatial_scale=0.25)
    check_grads(pool, (features,), order=1, modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_roi_align_layer_spec_and_summary_row():
    b = Builder((32, 32, 3))
    b.conv("conv", 8, 3, 2, 1)  # 16x16x8, jump 2
    b.roi_pool("roi", (4, 2), function="align")
    spec = b.specs[-1]
    assert spec.function == "align" and spec.out_shape == (4, 2, 8)
    assert spec.flops == 8 * 2 * 2 * (4 * 2 * 8)
    row = next(line for line in summary.format_table(b.specs).splitlines() if "roi_align" in line)
    assert "roi_align 4x2" in row and "2x2 bilinear samples a bin" in row
    with pytest.raises(UserError, match="RoI pooling 'avg': choose max or align"):
        Builder((8, 8, 3)).roi_pool("roi", 2, function="avg")
