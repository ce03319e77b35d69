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

How: a sub-window is any rectangle of cells, so each image's map is first turned into a
range-max table (a 2-D sparse table): T[a, b, y, x] = the max over the 2^a x 2^b cells from
(y, x), built with (log2 H + 1)(log2 W + 1) elementwise maxima of the map (and as many times
its memory). A sub-window of h x w cells is then covered exactly by four such windows of
2^floor(log2 h) x 2^floor(log2 w) cells (overlapping, anchored at its four corners), so each
output is the max of four gathered table cells: work per RoI is O(H_out * W_out * C),
whatever the RoI's size, instead of a pass over the whole map per bin (measured: forward and
backward of 512 RoIs on a 14x14x64 map to 7x7, ~30 ms on a loaded 2-core CPU, was ~400 ms).

jit-able and differentiable (reverse mode; a `jax.custom_vjp`, so `jax.jvp` through it
raises): the gradient of each output goes to its sub-window's maximum, the cell of the map
that the first of the four table cells holding it took its value from (where two cells of
the map hold the same maximum, the first along W, then along H). Under `jax.grad` the forward
pass builds, beside the table, the table of those cells (int32, as large), so the backward
pass is one scatter-add into the map.
"""

from __future__ import annotations

import functools

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


def range_max_table(x: jax.Array, axis: int, longest: int | None = None) -> jax.Array:
    """Returns [L, *x.shape], L = floor(log2(longest)) + 1 (`longest`: the longest range to
    be read, default the whole axis): level k holds, at position i, the max of `x` over
    [i, i + 2^k) along `axis` (where that window runs past the end, the max of what is left;
    never read by `roi_max_pool`)."""
    return _range_max_levels(x, None, axis, longest)[0]


def _shifted(a: jax.Array, half: int, axis: int) -> jax.Array:
    """`a` shifted left by `half` along `axis`, its last cells repeated at the end."""
    extent = a.shape[axis]
    return jnp.concatenate(
        [
            jax.lax.slice_in_dim(a, half, extent, axis=axis),
            jax.lax.slice_in_dim(a, extent - half, extent, axis=axis),
        ],
        axis=axis,
    )


def _range_max_levels(x, where, axis, longest):
    """`range_max_table` of `x`, and with `where` (int32, x's shape: each cell's own position)
    the table of where each level's maximum lies (the first of equal maxima), or None."""
    extent = x.shape[axis]
    tables, places = [x], [where]
    for k in range(1, min(extent, longest or extent).bit_length()):
        half = 1 << (k - 1)
        prev, ahead = tables[-1], _shifted(tables[-1], half, axis)
        if where is None:
            tables.append(jnp.maximum(prev, ahead))
            continue
        take = ahead > prev
        tables.append(jnp.where(take, ahead, prev))
        places.append(jnp.where(take, _shifted(places[-1], half, axis), places[-1]))
    return jnp.stack(tables), (None if where is None else jnp.stack(places))


def _cover(first: jax.Array, last: jax.Array, extent: int):
    """For ranges [first, last) (>= 1 cell; an empty one is treated as 1 cell, and its bin
    then reads the table's row of zeros instead): the level k = floor(log2(length)) and the
    starts of the two windows of 2^k cells that cover the range, [first, first + 2^k) and
    [last - 2^k, last)."""
    length = jnp.maximum(last - first, 1)
    level = 31 - jax.lax.clz(length.astype(jnp.int32))
    start = jnp.clip(first, 0, extent - 1)
    return level, start, jnp.clip(start + length - (1 << level), 0, extent - 1)


def _gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    return table.at[index].get(mode="promise_in_bounds")


def _table_2d(padded, longest, where=None):
    """The 2-D range-max table of maps [B, H, W, C] (along W, then along H: [Ly, Lx, B, H, W,
    C]) as rows of C, and with `where` the map position of each entry's maximum."""
    longest_x, longest_y = longest
    table, places = _range_max_levels(padded, where, 2, longest_x)
    table, places = _range_max_levels(table, places, 2, longest_y)
    rows = table.reshape(-1, padded.shape[-1])
    return rows, (None if places is None else places.reshape(rows.shape))


def _max_of_rows(table: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ([..., C]: the elementwise max of the rows `table[index[k]]` over k, and the
    flat position in `table` of each output's max, the first of the K rows holding it) for
    table [N, C] and index [K, ...] (in bounds)."""
    # K separate gathers and maxima: one gather of [K, ...] rows reduced over K was ~30x slower
    channels = table.shape[1]
    out = _gather_rows(table, index[0])
    winner = jnp.broadcast_to(index[0][..., None], out.shape)
    for k in range(1, index.shape[0]):
        rows = _gather_rows(table, index[k])
        winner = jnp.where(rows > out, index[k][..., None], winner)
        out = jnp.maximum(out, rows)
    return out, winner * channels + jnp.arange(channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pool_map(padded: jax.Array, index: jax.Array, longest: tuple) -> jax.Array:
    """[*index.shape[1:], C]: for each output, the max over the table rows `index` [K, ...]
    of the 2-D range-max table of `padded` [B, H, W, C] (`_table_2d`)."""
    table, _ = _table_2d(padded, longest)
    out = _gather_rows(table, index[0])
    for k in range(1, index.shape[0]):
        out = jnp.maximum(out, _gather_rows(table, index[k]))
    return out


def _pool_map_fwd(padded, index, longest):
    # the table built with the map position of each entry's maximum (int32, as large as the
    # table), so that each output's gradient goes straight to its map cell: back-propagating
    # through the table's chain of maxima instead was ~90 % of the op's forward and backward
    # (Fast R-CNN's training shapes, 2 x 24 x 24 x 128 maps, 128 RoIs: ~12 ms)
    b, h, w, c = padded.shape
    cells = jnp.arange(b * h * w, dtype=jnp.int32).reshape(b, h, w, 1)
    table, places = _table_2d(padded, longest, jnp.broadcast_to(cells, padded.shape))
    out, flat_winner = _max_of_rows(table, index)
    at = places.reshape(-1).at[flat_winner].get(mode="promise_in_bounds")
    return out, (at * c + jnp.arange(c), padded.shape)


def _pool_map_bwd(longest, residuals, grad):
    flat_at, shape = residuals
    size = shape[0] * shape[1] * shape[2] * shape[3]
    summed = jax.ops.segment_sum(grad.reshape(-1), flat_at.reshape(-1), size)
    return summed.reshape(shape), None


_pool_map.defvjp(_pool_map_fwd, _pool_map_bwd)


def roi_max_pool(
    features: jax.Array,
    boxes: jax.Array,
    batch_index: jax.Array,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
    inside: bool = False,
) -> jax.Array:
    """Returns [R, H_out, W_out, C]: the RoI max pooling of `features` [B, H, W, C] over
    `boxes` [R, 4] (x1, y1, x2, y2 in image pixels), box r on image `batch_index[r]`.

    `inside`: the boxes are first clipped to the map's extent in image pixels (a no-op for
    boxes inside the image, as a detector's proposals are), which bounds the bins' lengths
    and so the range-max table's levels: the same result, built faster."""
    out_h, out_w = _pair(output_size)
    batch, height, width, channels = features.shape
    boxes = jnp.asarray(boxes, jnp.float32)
    if inside:
        limit = jnp.array([width, height, width, height], jnp.float32) / spatial_scale
        boxes = jnp.clip(boxes, 0.0, limit)
    cells = jnp.floor(boxes * spatial_scale + 0.5).astype(jnp.int32)
    x_first, x_last = bin_edges(cells[:, 0], cells[:, 2], out_w, width)
    y_first, y_last = bin_edges(cells[:, 1], cells[:, 3], out_h, height)
    # along W ([B, H, W, C] axis 2), then along H (axis 2 of [Lx, B, H, W, C]): [Ly, Lx, B,
    # H, W + 1, C], flattened to rows of C. The map gets a column of zeros on its right first,
    # the row the empty bins read: no window of a bin reaches it, and it costs ~1/W more
    # table instead of a copy of the whole table (a zero row concatenated to it: ~20 % of
    # the op's time, measured on 8 x 24 x 24 x 128 maps and 2,400 RoIs)
    longest_x, longest_y = width, None
    if inside:
        # A bin spans at most ceil(size / bins) + 1 cells of a RoI of `size` <= extent cells
        # (bin_edges' floor and ceil): the table needs no level beyond that. Building every
        # level up to the whole map was most of the op's time (24 x 24 map, 3 x 3 bins:
        # 25 level pairs where 16 suffice; 7 x 7 bins: 9).
        longest_x = min(-(-width // out_w) + 1, width)
        longest_y = -(-height // out_h) + 1
    padded = jnp.pad(features, ((0, 0), (0, 0), (0, 1), (0, 0)))
    longest = (longest_x, longest_y)
    levels_x = longest_x.bit_length()  # _range_max_levels' count (longest_x <= width)
    ky, y_a, y_b = (v[:, :, None] for v in _cover(y_first, y_last, height))  # [R, H_out, 1]
    kx, x_a, x_b = (v[:, None, :] for v in _cover(x_first, x_last, width))  # [R, 1, W_out]
    image = jnp.asarray(batch_index, jnp.int32)[:, None, None]
    base = ((ky * levels_x + kx) * batch + image) * height
    empty = (y_last <= y_first)[:, :, None] | (x_last <= x_first)[:, None, :]
    index = jnp.stack(
        [
            jnp.where(empty, width, (base + y) * (width + 1) + x)  # [0, 0, 0, 0, W]: zeros
            for y in (y_a, y_b)
            for x in (x_a, x_b)
        ]
    )  # [4, R, H_out, W_out]
    # The index arithmetic (integer divisions) is per bin; unfenced, XLA:CPU fuses it into
    # the per-channel gathers and recomputes it C times (and masking the output instead of
    # the index cost 2x the whole op's time).
    index = jax.lax.optimization_barrier(index)
    return _pool_map(padded, index, longest)


ALIGN_SAMPLES = 2  # sampling points per bin along each axis (Mask R-CNN: "four regularly sampled")


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    batch_index: jax.Array,
    output_size: int | tuple[int, int],
    *,
    spatial_scale: float = 1.0,
    samples: int = ALIGN_SAMPLES,
) -> jax.Array:
    """Returns [R, H_out, W_out, C]: RoIAlign (He et al. 2017, Mask R-CNN, arXiv 1703.06870,
    section 3) of `features` [B, H, W, C] over `boxes` [R, 4] (x1, y1, x2, y2 in image
    pixels), box r on image `batch_index[r]`, aggregated by max as RoI max pooling is.

    No rounding: each box is mapped to the map (times `spatial_scale`) as it is and divided
    into H_out x W_out equal bins; each bin's value is the max over `samples` x `samples`
    regularly placed points (at (k + 1/2) / samples of the bin), each the bilinear
    interpolation of its four nearest cells (cell i's centre at i + 1/2, the continuous
    convention of RoI max pooling's edges; a point beyond the outer centres takes the edge's
    value). Differentiable through the interpolation weights' cells (jax's gather)."""
    out_h, out_w = _pair(output_size)
    _, height, width, _ = features.shape
    boxes = jnp.asarray(boxes, jnp.float32) * spatial_scale
    offsets = (jnp.arange(samples, dtype=jnp.float32) + 0.5) / samples

    def axis_points(start, end, bins, extent):
        # [R, bins * samples] sample positions in cell-centre coordinates, their lower cell,
        # upper cell and the weight of the upper one
        where = (jnp.arange(bins, dtype=jnp.float32)[:, None] + offsets[None, :]).reshape(-1)
        p = start[:, None] + (end - start)[:, None] / bins * where[None, :] - 0.5
        p = jnp.clip(p, 0.0, extent - 1.0)
        low = jnp.floor(p)
        return low.astype(jnp.int32), jnp.minimum(low.astype(jnp.int32) + 1, extent - 1), p - low

    y0, y1, fy = axis_points(boxes[:, 1], boxes[:, 3], out_h, height)
    x0, x1, fx = axis_points(boxes[:, 0], boxes[:, 2], out_w, width)
    image = jnp.asarray(batch_index, jnp.int32)[:, None, None]

    def at(y, x):  # [R, H_out * samples, W_out * samples, C]
        return features[image, y[:, :, None], x[:, None, :]]

    fy, fx = (
        fy[:, :, None, None].astype(features.dtype),
        fx[:, None, :, None].astype(features.dtype),
    )
    points = (at(y0, x0) * (1 - fx) + at(y0, x1) * fx) * (1 - fy) + (
        at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    ) * fy
    r, c = points.shape[0], points.shape[-1]
    return points.reshape(r, out_h, samples, out_w, samples, c).max(axis=(2, 4))


# RoI pooling functions by the `roi_pool` layer kind's `function` (same arguments)
ROI_FUNCTIONS = {"max": roi_max_pool, "align": roi_align}


def whole_map_pool(
    features: jax.Array, output_size: int | tuple[int, int], function: str = "max"
) -> jax.Array:
    """RoI pooling (`ROI_FUNCTIONS[function]`) with one RoI per image, the whole map: [B, H,
    W, C] -> [B, h, w, C] (for 'max', adaptive max pooling)."""
    b, height, width, _ = features.shape
    boxes = jnp.tile(jnp.array([[0.0, 0.0, width, height]], jnp.float32), (b, 1))
    return ROI_FUNCTIONS[function](features, boxes, jnp.arange(b), output_size)
