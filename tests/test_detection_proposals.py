"""detection.proposals: selective search recall on scenes, the disk cache, bad input."""

import numpy as np
import pytest

from detection import proposals, scenes
from errors import UserError


@pytest.fixture(scope="module")
def scene_set():
    return scenes.builtin_scenes(6, seed=5, image_size=64)


def test_recall_is_high_and_rises_with_the_number_of_proposals(scene_set, tmp_path):
    cache = proposals.ProposalCache(tmp_path)
    props = cache.get_all(scene_set.images)
    truth = [scene_set.objects(i)[0] for i in range(len(scene_set))]
    counts = (5, 20, 100, 500)
    r = proposals.recall(props, truth, counts=counts)
    for t in (0.5, 0.7):
        values = [r[t][n] for n in counts]
        assert values == sorted(values)  # never falls as N grows
    assert r[0.5][500] >= 0.9 and r[0.5][500] > r[0.5][5]
    assert r[0.7][500] >= 0.7
    for p in props:
        assert 1 <= len(p) <= proposals.Settings().max_proposals
        assert (p[:, 2:] > p[:, :2]).all() and (p >= 0).all() and (p <= 64).all()


def test_recall_counts_by_hand():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)]
    props = [np.array([[50, 50, 60, 60], [0, 0, 10, 12], [20, 20, 30, 40]], np.float32)]
    r = proposals.recall(props, truth, counts=(1, 2, 3), thresholds=(0.5, 0.7))
    # [0,0,10,12] has IoU 100/120 = 0.83 with the first box; [20,20,30,40] 0.5 with the second
    assert r[0.5] == {1: 0.0, 2: 0.5, 3: 1.0}
    assert r[0.7] == {1: 0.0, 2: 0.5, 3: 0.5}
    with pytest.raises(UserError, match="no ground-truth"):
        proposals.recall([props[0]], [np.zeros((0, 4))])


def test_cache_hits_settings_and_corrupt_files(scene_set, tmp_path):
    image = scene_set.images[0]
    cache = proposals.ProposalCache(tmp_path)
    first = cache.get(image)
    assert cache.get(image) is not None and cache.stats == {
        "hits": 1,
        "misses": 1,
        "recomputed": 0,
    }
    np.testing.assert_array_equal(cache.get(image), first)
    # the order too is reproducible (OpenCV's random ranking is seeded)
    np.testing.assert_array_equal(proposals.selective_search(image), first)
    # other settings: another file
    capped = proposals.ProposalCache(tmp_path, proposals.Settings(max_proposals=7))
    assert capped.path(image) != cache.path(image)
    np.testing.assert_array_equal(capped.get(image), first[:7])
    # a corrupt file is recomputed, not used
    cache.path(image).write_bytes(b"not an npz")
    np.testing.assert_array_equal(cache.get(image), first)
    assert cache.stats["recomputed"] == 1
    # a file holding other settings (copied over) is recomputed too
    cache.path(image).write_bytes(capped.path(image).read_bytes())
    np.testing.assert_array_equal(cache.get(image), first)
    assert cache.stats["recomputed"] == 2
    # the real file cut short (a disk filled mid-write), and a real file whose boxes lie
    # outside the image (proposals of another image's size): recomputed, not used
    whole = cache.path(image).read_bytes()
    cache.path(image).write_bytes(whole[: len(whole) // 2])
    np.testing.assert_array_equal(cache.get(image), first)
    outside = first.copy()
    outside[0, 2] = image.shape[1] + 10
    np.savez(cache.path(image), boxes=outside, settings=np.array(cache.settings.key()))
    np.testing.assert_array_equal(cache.get(image), first)
    assert cache.stats["recomputed"] == 4
    # quality mode differs and gives more boxes on this scene
    quality = proposals.selective_search(image, proposals.Settings(mode="quality"))
    assert len(quality) > len(first)


def test_bad_input_and_a_blank_image():
    blank = np.zeros((32, 32, 3), np.uint8)
    got = proposals.selective_search(blank)
    assert got.shape[1] == 4 and len(got) >= 1  # at worst the whole image
    # nothing left after the size filter (every box is narrower than 40 px in a 32 px image):
    # the whole image is the one proposal, not an empty list
    whole = proposals.selective_search(blank, proposals.Settings(min_size=40.0))
    np.testing.assert_array_equal(whole, [[0, 0, 32, 32]])
    with pytest.raises(UserError, match="uint8 image"):
        proposals.selective_search(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(UserError, match="proposal mode"):
        proposals.Settings(mode="slow")
