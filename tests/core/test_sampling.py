"""MARS and SRR-TA on real Dubai labels (core/sampling.py): anchor constraints, containment, sizes,
bounded anchor search, region purity and rarity order, centred and consistently flipped crops,
deterministic sampler."""
from __future__ import annotations

import time

import numpy as np
import pytest

from core.classtable import IGNORE
from core.finetune.sources import load_dubai
from core.errors import InputError
from core.finetune.sampler import TrainingSampler
from core.finetune.srrta import centred_box, mine_regions, srr_crops
from core.finetune.mars import context_window, mars_samples
from core.finetune.crops import resize_label

CROP = 512


@pytest.fixture(scope="module")
def dubai():
    # tile_1 (797x644), tile_2 (509x544, smaller than a crop), tile_5 (1126x1058), tile_8 (2149x1479)
    return load_dubai(["tile_1", "tile_2", "tile_5", "tile_8"])


@pytest.fixture(scope="module")
def by_name(dubai):
    return {s.name: s for s in dubai}


@pytest.fixture(scope="module")
def regions(dubai):
    return mine_regions([s.label for s in dubai], 5)


def contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def exact_stats(label):
    counts = np.bincount(label.ravel(), minlength=256)[:255]
    return int((counts > 0).sum()), counts.max() / counts.sum()


# -- MARS --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tile_8/image_part_003", "tile_8/image_part_007", "tile_5/image_part_002",
                                  "tile_1/image_part_001"])
def test_mars_anchor_constraints_and_containment_on_real_labels(by_name, name):
    s = by_name[name]
    H, W = s.label.shape
    for seed in range(4):
        r = mars_samples(s.label, np.random.default_rng(seed), CROP, (2, 3, 4), image=s.image, source=name)
        ax0, ay0, ax1, ay1 = r.anchor.box
        assert (ax1 - ax0, ay1 - ay0) == (CROP, CROP) and 0 <= ax0 and 0 <= ay0 and ax1 <= W and ay1 <= H
        assert r.anchor_ok, r.notes
        n, share = exact_stats(s.label[ay0:ay1, ax0:ax1])  # recomputed independently
        assert n >= 2 and share < 0.75
        assert (r.anchor_classes, r.anchor_max_share) == (n, pytest.approx(share))
        assert [w.k for w in r.windows] == [2, 3, 4]
        for w in r.windows:
            x0, y0, x1, y1 = w.box
            assert x1 - x0 == y1 - y0 == min(CROP * w.k, H, W) == w.side
            assert w.shrunk == (w.side < CROP * w.k)
            assert 0 <= x0 and 0 <= y0 and x1 <= W and y1 <= H
            assert contains(w.box, r.anchor.box)
            if not w.shrunk and 0 < x0 and x1 < W:  # not shifted at a border: on the anchor's crop-px grid
                assert (ax0 - x0) % CROP == 0
        for smp in r.samples:
            assert smp.image.shape == (3, CROP, CROP) and smp.image.dtype == np.float32
            assert smp.label.shape == (CROP, CROP) and smp.label.dtype == np.uint8
            assert 0.0 <= smp.image.min() and smp.image.max() <= 255.0


def test_mars_context_labels_are_nearest_resized(by_name):
    s = by_name["tile_8/image_part_005"]
    r = mars_samples(s.label, np.random.default_rng(3), CROP, (2,), image=s.image)
    [w] = r.windows
    assert w.side == 2 * CROP
    x0, y0, x1, y1 = w.box
    # A 2:1 centre-aligned nearest resize picks the pixel at 2i+1 of each pair.
    np.testing.assert_array_equal(r.samples[1].label, s.label[y0 + 1:y1:2, x0 + 1:x1:2])
    anchor = r.samples[0]
    ax0, ay0, ax1, ay1 = r.anchor.box
    np.testing.assert_array_equal(anchor.label, s.label[ay0:ay1, ax0:ax1])
    np.testing.assert_array_equal(anchor.image, s.image[:, ay0:ay1, ax0:ax1].astype(np.float32))
    # Antialiased bilinear 2:1 = the separable triangle kernel [1, 3, 3, 1] / 8 around pixels 2i, 2i+1.
    src = s.image[:, y0:y1, x0:x1].astype(np.float64)
    kern = np.array([1, 3, 3, 1]) / 8.0
    rows = sum(kern[t] * src[:, :, 1 + t:1 + t + 2 * (CROP - 2):2] for t in range(4))   # output cols 1..CROP-2
    both = sum(kern[t] * rows[:, 1 + t:1 + t + 2 * (CROP - 2):2, :] for t in range(4))  # output rows 1..CROP-2
    np.testing.assert_allclose(r.samples[1].image[:, 1:CROP - 1, 1:CROP - 1], both,
                               atol=1e-3)


def test_mars_images_smaller_than_the_crop_are_padded(by_name):
    s = by_name["tile_2/image_part_001"]  # 509 x 544
    H, W = s.label.shape
    assert W < CROP
    r = mars_samples(s.label, np.random.default_rng(0), CROP, (2, 3, 4), image=s.image)
    assert r.padded_shape == (H, CROP)
    anchor = r.samples[0]
    assert (anchor.label[:, W:] == IGNORE).all()
    assert all(w.shrunk and w.side == CROP and "smaller" in w.note for w in r.windows)
    # Every context window equals the anchor here: no duplicate samples.
    assert all(w.duplicate for w in r.windows) and len(r.samples) == 1


def test_mars_shrunk_windows_on_a_mid_size_tile(by_name):
    s = by_name["tile_1/image_part_002"]
    H, W = s.label.shape
    r = mars_samples(s.label, np.random.default_rng(1), CROP, (2, 3, 4))
    for w in r.windows:
        assert w.shrunk and w.side == min(H, W) and contains(w.box, r.anchor.box)
    assert r.samples[0].image is None  # no image given: labels only


@pytest.mark.parametrize("kind", ["all_ignore", "single_class", "tile_7_part_008"])
def test_mars_never_hangs_on_background_labels(kind):
    if kind == "tile_7_part_008":
        [s] = load_dubai(["tile_7"], parts=[8])  # a real label that is 100 % land
        label = s.label
        assert set(np.unique(label).tolist()) == {1}
    elif kind == "all_ignore":
        label = np.full((1479, 2149), IGNORE, np.uint8)
    else:
        label = np.ones((1479, 2149), np.uint8)
    t = time.perf_counter()
    r = mars_samples(label, np.random.default_rng(0), CROP, (2, 3, 4), max_tries=100000)
    assert time.perf_counter() - t < 2.0
    assert not r.anchor_ok and r.tries == 1 and r.notes
    assert len(r.windows) == 3 and all(contains(w.box, r.anchor.box) for w in r.windows)


def test_mars_falls_back_when_no_crop_qualifies_on_a_real_label(by_name):
    # tile_1/image_part_004: brute force finds no 512 px crop with a largest share < 0.75.
    s = by_name["tile_1/image_part_004"]
    L = s.label
    H, W = L.shape
    shares = [exact_stats(L[y:y + CROP, x:x + CROP])[1] for y in range(0, H - CROP + 1, 16)
              for x in range(0, W - CROP + 1, 16)]
    assert min(shares) >= 0.75
    t = time.perf_counter()
    r = mars_samples(L, np.random.default_rng(0), CROP, (2, 3, 4), image=s.image)
    assert time.perf_counter() - t < 2.0
    assert not r.anchor_ok and "best-scoring" in r.notes[0]
    x0, y0, x1, y1 = r.anchor.box
    assert r.anchor_max_share <= min(shares) + 0.05  # close to the best crop there is
    assert len(r.samples) >= 2 and all(contains(w.box, r.anchor.box) for w in r.windows)


def test_mars_bounded_tries_fall_back_to_the_best_crop(by_name):
    # A real label where 2-class crops exist but a share < 0.01 is impossible.
    s = by_name["tile_8/image_part_001"]
    t = time.perf_counter()
    r = mars_samples(s.label, np.random.default_rng(0), CROP, (2,), max_tries=40, max_share=0.01)
    assert time.perf_counter() - t < 2.0
    assert not r.anchor_ok and r.tries <= 40 and "best-scoring" in r.notes[0]
    assert r.anchor_classes >= 2


def test_context_window_grid_and_clipping():
    rng = np.random.default_rng(0)
    anchor = (1024, 512, 1536, 1024)
    seen = set()
    for _ in range(200):
        w = context_window(anchor, 3, (4096, 4096), CROP, rng)
        assert contains(w.box, anchor) and w.side == 1536 and not w.shrunk
        assert (anchor[0] - w.box[0]) % CROP == 0 and (anchor[1] - w.box[1]) % CROP == 0
        seen.add(w.box[:2])
    assert len(seen) == 6  # x offsets 0/512/1024 below the anchor, y offsets 0/512 (clipped at the top)
    for _ in range(100):  # near the bottom-right border of a 1100 x 1300 image
        w = context_window((700, 500, 1212, 1012), 4, (1100, 1300), CROP, rng)
        assert w.shrunk and w.side == 1100 and contains(w.box, (700, 500, 1212, 1012))
        assert w.box[2] <= 1300 and w.box[3] <= 1100


def test_resize_label_nearest_keeps_class_ids():
    lab = np.arange(36, dtype=np.uint8).reshape(6, 6)
    out = resize_label(lab, 3)
    np.testing.assert_array_equal(out, lab[1::2, 1::2])
    assert set(np.unique(resize_label(lab, 4)).tolist()) <= set(lab.ravel().tolist())


# -- SRR-TA ------------------------------------------------------------------------------------------
def test_srr_rarity_order_matches_the_pixel_counts(dubai, regions):
    counts = np.zeros(5, np.int64)
    for s in dubai:
        counts += np.bincount(s.label.ravel(), minlength=256)[:5]
    np.testing.assert_array_equal(regions.class_pixels, counts)
    order = np.argsort(counts, kind="stable")
    assert [regions.class_rank[c] for c in order] == [0, 1, 2, 3, 4]
    for regs in regions.regions:
        keys = [(regions.class_rank[r.cls], -r.richness, -r.area) for r in regs]
        assert keys == sorted(keys)
    # Images holding the rarest class start with a region of it.
    rarest = int(order[0])
    for s, regs in zip(dubai, regions.regions):
        pure_rarest = [r for r in regs if r.cls == rarest]
        if pure_rarest:
            assert regs[0].cls == rarest


def test_srr_boxes_are_class_pure(dubai, regions):
    total = 0
    for i, (s, regs) in enumerate(zip(dubai, regions.regions)):
        H, W = s.label.shape
        for r in regs:
            x0, y0, x1, y1 = r.box
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H and r.image == i
            counts = np.bincount(s.label[y0:y1, x0:x1].ravel(), minlength=256)[:255]
            assert counts.argmax() == r.cls
            assert counts[r.cls] / counts.sum() >= 0.75
            assert r.purity == pytest.approx(counts[r.cls] / counts.sum())
            assert r.richness == int((counts > 0).sum())
            assert r.area == counts[r.cls] >= 100
            total += 1
    assert total > 100
    assert sum(1 for regs in regions.regions if regs) >= len(dubai) - 1


def test_srr_crops_are_centred_and_flipped_consistently(by_name, dubai, regions):
    names = [s.name for s in dubai]
    i = names.index("tile_8/image_part_004")
    s = dubai[i]
    H, W = s.label.shape
    regs = regions.top(i, 8)
    assert len(regs) == 8
    crops = srr_crops(s.image, s.label, regs, 8, np.random.default_rng(5), CROP)
    assert len(crops) == 8
    flips = set()
    for reg, c in zip(regs, crops):
        x0, y0, x1, y1 = c.box
        assert (x1 - x0, y1 - y0) == (CROP, CROP) and 0 <= x0 and 0 <= y0 and x1 <= W and y1 <= H
        rcx, rcy = (reg.box[0] + reg.box[2]) / 2, (reg.box[1] + reg.box[3]) / 2
        if CROP / 2 <= rcx <= W - CROP / 2:
            assert abs((x0 + x1) / 2 - rcx) <= 0.5
        else:  # clipped at the border, still holding the region's centre
            assert x0 in (0, W - CROP) and x0 <= rcx <= x1
        if CROP / 2 <= rcy <= H - CROP / 2:
            assert abs((y0 + y1) / 2 - rcy) <= 0.5
        else:
            assert y0 in (0, H - CROP) and y0 <= rcy <= y1
        img = s.image[:, y0:y1, x0:x1].astype(np.float32)
        lab = s.label[y0:y1, x0:x1]
        if c.flip_h:
            img, lab = img[:, :, ::-1], lab[:, ::-1]
        if c.flip_v:
            img, lab = img[:, ::-1, :], lab[::-1, :]
        np.testing.assert_array_equal(c.image, img)
        np.testing.assert_array_equal(c.label, lab)
        flips.add((c.flip_h, c.flip_v))
        assert c.kind == "srr" and c.image.dtype == np.float32
    assert len(flips) >= 2


def test_centred_box_at_borders():
    assert centred_box((10, 10, 30, 30), (1000, 1000), 512) == (0, 0, 512, 512)
    assert centred_box((980, 980, 1000, 1000), (1000, 1000), 512) == (488, 488, 1000, 1000)
    assert centred_box((400, 300, 600, 500), (1000, 1000), 512) == (244, 144, 756, 656)


def test_srr_cache_round_trip(tmp_path, dubai):
    labels = [s.label for s in dubai[:9]]
    a = mine_regions(labels, 5, cache_dir=tmp_path)
    assert not a.cached and len(list(tmp_path.glob("srr-regions-*.json"))) == 1
    b = mine_regions(labels, 5, cache_dir=tmp_path)
    assert b.cached and b.key == a.key
    assert [[(r.cls, r.box, r.area, r.richness) for r in rs] for rs in b.regions] == \
           [[(r.cls, r.box, r.area, r.richness) for r in rs] for rs in a.regions]
    changed = [l.copy() for l in labels]
    changed[0][:10, :10] = 255
    c = mine_regions(changed, 5, cache_dir=tmp_path)
    assert not c.cached and c.key != a.key


def test_srr_optional_miner_interface(dubai):
    calls = []

    def grid_miner(image, label):  # stands in for SAM-HQ: proposes boxes, the label decides
        calls.append(image.shape)
        H, W = label.shape
        return [(x, y, min(x + 128, W), min(y + 128, H)) for y in range(0, H, 128) for x in range(0, W, 128)]

    grid_miner.cache_id = "grid-128"
    sub = dubai[:3]
    idx = mine_regions([s.label for s in sub], 5, miner=grid_miner, images=[s.image for s in sub])
    assert len(calls) == 3 and idx.params["miner"] == "grid-128"
    for s, regs in zip(sub, idx.regions):
        for r in regs:
            x0, y0, x1, y1 = r.box
            assert (x1 - x0) <= 128 and (y1 - y0) <= 128 and r.purity >= 0.75
    with pytest.raises(InputError, match="images"):
        mine_regions([s.label for s in sub], 5, miner=grid_miner)


# -- the sampler -------------------------------------------------------------------------------------
def test_sampler_is_deterministic_and_order_independent(dubai, regions):
    a = TrainingSampler(dubai, 5, seed=7, regions=regions)
    b = TrainingSampler(dubai, 5, seed=7, regions=regions)
    i = 30
    first = a.draw(i, 2)
    b.draw(3, 0)  # other draws before do not change it
    second = b.draw(i, 2)
    kinds = [s.kind for s in first]
    assert kinds[0] == "anchor" and kinds[-4:] == ["srr"] * 4 and set(kinds[1:-4]) == {"context"}
    for x, y in zip(first, second):
        assert x.box == y.box and (x.flip_h, x.flip_v) == (y.flip_h, y.flip_v)
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.label, y.label)
        assert x.image.shape == (3, CROP, CROP) and x.image.dtype == np.float32
        assert x.label.shape == (CROP, CROP) and x.label.dtype == np.uint8
    other = TrainingSampler(dubai, 5, seed=8, regions=regions).draw(i, 2)
    assert [s.box for s in other] != [s.box for s in first]
    assert sorted(a.epoch_order(0).tolist()) == list(range(len(dubai)))
    shards = [list(a.epoch_order(1)[r::2]) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(len(dubai)))


def test_sampler_ablation_switches(dubai, regions):
    plain = TrainingSampler(dubai, 5, seed=0, mars=False, srr=False)
    out = plain.draw(0)
    assert [s.kind for s in out] == ["random"] and plain.regions is None
    mars_only = TrainingSampler(dubai, 5, seed=0, srr=False)
    assert {s.kind for s in mars_only.draw(30)} == {"anchor", "context"}
    srr_only = TrainingSampler(dubai, 5, seed=0, mars=False, regions=regions, srr_k=2)
    assert [s.kind for s in srr_only.draw(30)] == ["random", "srr", "srr"]


def test_sampler_leaves_out_unlabelled_images(dubai):
    class Blank:
        name = "blank"
        image = np.zeros((3, 600, 600), np.uint8)
        label = np.full((600, 600), IGNORE, np.uint8)

    s = TrainingSampler([Blank()] + list(dubai[:2]), 5, srr=False)
    assert len(s) == 2 and "blank" in s.notes[0]
    with pytest.raises(InputError, match="labelled pixel"):
        TrainingSampler([Blank()], 5)
