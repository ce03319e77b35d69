"""Translating images by whole pixels, on the device, for the translation-invariance measures.

Convention: an offset (dy, dx) moves the picture dy pixels down and dx pixels right (negative:
up, left). `circular` shifts wrap the pixels that leave one side around to the other (so no
information is lost and a network of circular convolutions with stride 1 and global pooling is
exactly invariant); zero-fill shifts drop them and fill the vacated pixels with 0 (black, in
uint8 pixel space before normalisation, like the padding of the random-crop augmentation).
"""

import jax
import jax.numpy as jnp
import numpy as np

# The shift curve moves example r of each eval batch by k pixels in direction r mod 4: right,
# left, down, up. Each direction covers a quarter of the split and a shift of k costs one pass.
DIRECTIONS = np.array([(0, 1), (0, -1), (1, 0), (-1, 0)], np.int32)


def translate(images: jax.Array, offsets: jax.Array, *, circular: bool) -> jax.Array:
    """Returns images [B, H, W, C], example b moved by offsets[b] = (dy, dx) pixels.

    `offsets`: int [B, 2], may be traced (one compiled function serves every shift). Same dtype
    as `images`. `circular` is static: wrap around, or fill the vacated pixels with zeros.
    """
    _, height, width, _ = images.shape
    # Output pixel (i, j) of example b comes from input pixel (i - dy, j - dx).
    rows = jnp.arange(height)[None, :] - offsets[:, 0:1]  # [B, H]
    cols = jnp.arange(width)[None, :] - offsets[:, 1:2]  # [B, W]

    def gather(image, r, c):
        return image[jnp.mod(r, height)][:, jnp.mod(c, width)]

    moved = jax.vmap(gather)(images, rows, cols)
    if circular:
        return moved
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None]
    return jnp.where(inside[..., None], moved, jnp.zeros((), images.dtype))


def curve_offsets(batch_size: int, shift: jax.Array) -> jax.Array:
    """Returns int32 [B, 2]: `shift` pixels in direction DIRECTIONS[row mod 4] for each row."""
    return jnp.asarray(DIRECTIONS)[jnp.arange(batch_size) % len(DIRECTIONS)] * shift


def random_offsets(key: jax.Array, batch_size: int, max_shift: int) -> jax.Array:
    """Returns int32 [B, 2]: (dy, dx) drawn uniformly from [-max_shift, max_shift]^2."""
    return jax.random.randint(key, (batch_size, 2), -max_shift, max_shift + 1, jnp.int32)
