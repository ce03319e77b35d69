"""RoI max pooling (Fast R-CNN, Girshick 2015, arXiv 1504.08083, section 2.1).

Each region of interest (RoI), a box on the image, is projected onto the feature map
(multiplied by `spatial_scale`, the map's size over the image's: 1 / the product of the
strides before it), its edges rounded to feature-map cells, and divided into an H x W grid of
sub-windows of about (h/H) x (w/W) cells; each output cell is the max over its sub-window, per
channel. The quantisation is the paper's (its Caffe layer, `roi_pooling_layer.cu`), written in
the continuous box convention of `detection.boxes` (x2 exclusive):

    start = floor(x1 * scale + 0.5)          end = floor(x2 * scale + 0.5)
    size = max(end - start, 1)               bin = size / W
    bin j covers cells [start + floor(j * bin), start + ceil((j + 1) * bin)), clipped to
    the map (computed exactly, in integers); an empty bin (the RoI outside the map) outputs 0.

For the RoI of the whole map this is adaptive max pooling (torch's `adaptive_max_pool2d`):
what the `roi_pool` layer kind (`models.kinds.RoiPool`) computes inside a `Network`, where
the only region is the whole map. A detector calls `roi_max_pool` with its proposals.

jit-able and differentiable: the gradient of each output goes to its sub-window's maximum.
Memory: the max is separable (columns, then rows), with [R, H, W_out, W, C] and
[R, H_out, H, W_out, C] intermediates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def bin_edges(
    start: jax.Array, end: jax.Array, bins: int, extent: int
) -> tuple[jax.Array, jax.Array]:
    """Returns int32 (first [R, bins], last exclusive [R, bins]) cells of each RoI's bins along
    one axis, for RoI edges `start`, `end` [R] already in (rounded) feature-map cells."""
    # floor(j * size / bins) and ceil((j + 1) * size / bins) in exact integer arithmetic (in
    # float32, 7 * (3 / 7) rounds above 3 and ceil() takes one cell too many)
    size = jnp.maximum(end - start, 1)[:, None]
    j = jnp.arange(bins, dtype=jnp.int32)[None, :]
    first = (j * size) // bins + start[:, None]
    last = -((-(j + 1) * size) // bins) + start[:, None]
    return jnp.clip(first, 0, extent), jnp.clip(last, 0, extent)


def roi_max_pool(
    features: jax.Array,
    boxes: jax.Array,
    batch_index: jax.Array,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
) -> jax.Array:
    """Returns [R, H_out, W_out, C]: the RoI max pooling of `features` [B, H, W, C] over
    `boxes` [R, 4] (x1, y1, x2, y2 in image pixels), box r on image `batch_index[r]`."""
    out_h, out_w = _pair(output_size)
    _, height, width, _ = features.shape
    boxes = jnp.asarray(boxes, jnp.float32)
    cells = jnp.floor(boxes * spatial_scale + 0.5).astype(jnp.int32)
    x_first, x_last = bin_edges(cells[:, 0], cells[:, 2], out_w, width)
    y_first, y_last = bin_edges(cells[:, 1], cells[:, 3], out_h, height)
    x = jnp.arange(width)
    y = jnp.arange(height)
    in_col = (x[None, None, :] >= x_first[..., None]) & (x[None, None, :] < x_last[..., None])
    in_row = (y[None, None, :] >= y_first[..., None]) & (y[None, None, :] < y_last[..., None])
    low = jnp.array(-jnp.inf, features.dtype)
    f = features[batch_index]  # [R, H, W, C]
    # max over each bin's columns: [R, H, W_out, C]
    cols = jnp.max(jnp.where(in_col[:, None, :, :, None], f[:, :, None, :, :], low), axis=3)
    # then over its rows: [R, H_out, W_out, C]
    out = jnp.max(jnp.where(in_row[:, :, :, None, None], cols[:, None], low), axis=2)
    empty = (y_last <= y_first)[:, :, None] | (x_last <= x_first)[:, None, :]
    return jnp.where(empty[..., None], jnp.zeros((), features.dtype), out)


def whole_map_max_pool(features: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """RoI max pooling with one RoI per image, the whole map: [B, H, W, C] -> [B, h, w, C]
    (adaptive max pooling)."""
    b, height, width, _ = features.shape
    boxes = jnp.tile(jnp.array([[0.0, 0.0, width, height]], jnp.float32), (b, 1))
    return roi_max_pool(features, boxes, jnp.arange(b), output_size)
