"""Training augmentations (issue 12, part 2; core.finetune.augment) on a real Dubai image and its mask: the
geometry stays aligned between image and label, photometric jitter changes colours only, draws are
reproducible, and a bad level is refused naming --augment."""
from __future__ import annotations

import numpy as np
import pytest

from core.errors import InputError
from core.finetune.augment import AUGMENTS, photometric
from core.finetune.config import TrainConfig
from core.finetune.sampler import TrainingSampler
from core.finetune.sources import load_dubai


@pytest.fixture(scope="module")
def image():
    return load_dubai(["tile_2"], parts=[5])[0]


def _undo(sample):
    """The sample's image and label with its quarter turns and flips undone (inverse order)."""
    img, lab = np.rot90(sample.image, -sample.turns, axes=(1, 2)), np.rot90(sample.label, -sample.turns)
    if sample.flip_v:
        img, lab = img[:, ::-1], lab[::-1]
    if sample.flip_h:
        img, lab = img[:, :, ::-1], lab[:, ::-1]
    return img, lab


def _anchors(im, level, seed=0, draws=12):
    s = TrainingSampler([im], 5, crop=128, seed=seed, srr=False, augment=level)
    return [x for e in range(draws) for x in s.draw(0, e) if x.kind == "anchor" and x.scale == 1.0]


@pytest.mark.parametrize("level", ["d4", "photometric"])
def test_turned_and_flipped_crops_keep_image_and_label_aligned(image, level):
    anchors = _anchors(image, level)
    assert {a.turns for a in anchors} >= {1, 2, 3} and len(anchors) >= 8  # every quarter turn is drawn
    for a in anchors:
        x0, y0, x1, y1 = a.box
        img, lab = _undo(a)
        assert np.array_equal(lab, image.label[y0:y1, x0:x1])  # the label is the crop's, exactly
        src = image.image[:, y0:y1, x0:x1].astype(np.float32)
        if level == "d4":
            assert np.array_equal(img, src)
        else:  # colours changed, geometry not: the undone image correlates with the crop, pixel for pixel
            assert not np.allclose(img, src)
            assert np.corrcoef(img.ravel(), src.ravel())[0, 1] > 0.9


def test_photometric_jitter_stays_in_range_and_is_reproducible(image):
    crop = image.image[:, :128, :128].astype(np.float32)
    a = photometric(crop, np.random.default_rng(1))
    b = photometric(crop, np.random.default_rng(1))
    assert a.dtype == np.float32 and a.shape == crop.shape and 0 <= a.min() and a.max() <= 255
    assert np.array_equal(a, b) and not np.array_equal(a, photometric(crop, np.random.default_rng(2)))
    d1 = [(x.turns, x.flip_h, x.box) for x in _anchors(image, "photometric", seed=4, draws=3)]
    d2 = [(x.turns, x.flip_h, x.box) for x in _anchors(image, "photometric", seed=4, draws=3)]
    assert d1 == d2


def test_flip_is_the_default_and_a_bad_level_is_refused():
    assert TrainConfig().augment == "flip" and AUGMENTS == ("flip", "d4", "photometric")
    with pytest.raises(InputError, match="--augment must be one of flip, d4, photometric"):
        TrainConfig(augment="rotate").validate()
