"""Training augmentations beyond flips (issue 12, part 2: candidates of the training recipe).

Levels (``TrainConfig.augment``, ``finetune --augment``), each including the one before:

- ``flip``: horizontal and vertical flips (the sampler's own, :func:`core.finetune.crops.random_flip`).
- ``d4``: + a random number of quarter turns, so with the flips any of the 8 symmetries of the square
  (aerial imagery has no up: a roof seen turned is still a roof).
- ``photometric``: + colour and sensor jitter, the gap between tiles being colour, season and sensor
  (issue 12: the training loss falls to ~0.2 while held-out tiles stall): with probability 0.8 each,
  brightness, contrast and saturation factors in [0.75, 1.25] and a hue shift in [-0.04, 0.04] of a turn
  (torchvision's ``adjust_*``, as ``ColorJitter(0.25, 0.25, 0.25, 0.04)`` of SimCLR-style recipes, milder
  because the class is in the colour: water is blue, vegetation green); a per-band gain in [0.9, 1.1]
  (white balance); a gamma in [0.8, 1.25]; and with probability 0.2 a Gaussian blur of sigma 0.1–1.2 px
  (focus, resampling).

Geometry is applied jointly to image and label; photometric changes to the image only. Everything is
drawn from the sampler's seeded generator: a draw is reproducible.
"""
from __future__ import annotations

import numpy as np

AUGMENTS = ("flip", "d4", "photometric")
"""The accepted ``--augment`` levels, weakest first (this module imports torch only to jitter)."""


def turn_sample(sample, k: int):
    """Turn a square sample ``k`` quarter turns counter-clockwise (image (3, S, S) and label (S, S) jointly);
    records it in ``sample.note``. Returns the sample."""
    k = int(k) % 4
    if k:
        sample.label = np.ascontiguousarray(np.rot90(sample.label, k))
        if sample.image is not None:
            sample.image = np.ascontiguousarray(np.rot90(sample.image, k, axes=(1, 2)))
        sample.turns = k
    return sample


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The ``photometric`` jitter of the module docstring on a float32 (C, H, W) image on 0..255 (C >= 3: the
    colour jitter on the RGB bands, gain, gamma and blur on all); returns a new float32 image on 0..255."""
    import torch
    import torchvision.transforms.v2.functional as TF

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / 255.0)
    if rng.random() < 0.8:
        x = TF.adjust_brightness(x, float(rng.uniform(0.75, 1.25)))
    rgb, extra = x[:3], x[3:]  # colour jitter is RGB's; added bands (near-infrared ...) get the rest
    if rng.random() < 0.8:
        rgb = TF.adjust_contrast(rgb, float(rng.uniform(0.75, 1.25)))
    if rng.random() < 0.8:
        rgb = TF.adjust_saturation(rgb, float(rng.uniform(0.75, 1.25)))
    if rng.random() < 0.8:
        rgb = TF.adjust_hue(rgb, float(rng.uniform(-0.04, 0.04)))
    x = torch.cat([rgb, extra]) if extra.shape[0] else rgb
    x = x * torch.from_numpy(rng.uniform(0.9, 1.1, size=(x.shape[0], 1, 1)).astype(np.float32))
    x = x.clamp(0.0, 1.0) ** float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    if rng.random() < 0.2:
        sigma = float(rng.uniform(0.1, 1.2))
        size = 2 * int(np.ceil(2 * sigma)) + 1
        x = TF.gaussian_blur(x, [size, size], [sigma, sigma])
    return (x.clamp(0.0, 1.0) * 255.0).numpy()


def augment_sample(sample, rng: np.random.Generator, level: str):
    """Apply ``level``'s augmentations beyond flips (``d4``: a turn; ``photometric``: a turn and the jitter)
    to ``sample`` in place; ``flip`` changes nothing here. Returns the sample."""
    if level in ("d4", "photometric"):
        turn_sample(sample, int(rng.integers(0, 4)))
    if level == "photometric" and sample.image is not None:
        sample.image = photometric(sample.image, rng)
    return sample
