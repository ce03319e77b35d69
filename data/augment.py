"""On-device preprocessing, called inside the jit-compiled train/eval steps.

The CIFAR recipe (He et al. 2015, arXiv 1512.03385, section 4.2; Springenberg et al. 2014,
arXiv 1412.6806, section 3.2.1): pad 4 pixels with zeros on each side, take a random crop of
the original size, flip horizontally with probability 1/2. Randomness comes from an explicit
key, one independent draw per example, so a step is reproducible from (key, batch).
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _per_example(images: jax.Array) -> NamedSharding | None:
    """Returns the layout for per-example random draws: that of the images' batch axis.

    Under a mesh with Explicit axes the draws must be sharded like the images (vmap refuses
    mixed layouts); elsewhere (Auto axes, one device) the compiler chooses and this is None.
    """
    sharding = jax.typeof(images).sharding
    batch_axis = sharding.spec[0] if len(sharding.spec) else None
    return None if batch_axis is None else NamedSharding(sharding.mesh, P(batch_axis))


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Returns images [B, H, W, C] each cut from its zero-padded copy at a random offset.

    Equivalent to a random translation by up to `padding` pixels on each axis with zeros
    shifted in. Same dtype as `images`.
    """
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(
        key, (batch, 2), 0, 2 * padding + 1, out_sharding=_per_example(images)
    )

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Returns images [B, H, W, C], each mirrored left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],), out_sharding=_per_example(images))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def augment(key: jax.Array, images: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
    """Returns randomly cropped (after `crop_padding` zero pixels) and flipped images.

    `images`: [B, H, W, C], uint8 or float; the result has the same shape and dtype.
    `crop_padding` 0 and `flip` False return `images` unchanged. Both are Python values (static
    under jit). Deterministic given `key`; each example draws its own offset and flip.
    """
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        images = random_crop(crop_key, images, crop_padding)
    if flip:
        images = random_flip(flip_key, images)
    return images


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """Returns (images / 255 - mean) / std in `dtype`; mean, std: [C] (per channel, in [0, 1]).

    Computed in float32 and cast at the end, so bfloat16 models lose no precision here.
    """
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)
