"""The SRMF network: a SegFormer-style encoder–decoder with text–visual fusion.

SRMF (Yang et al., IEEE TGRS 2025, arXiv 2504.19839), "general representation knowledge injection":
the all-MLP SegFormer head (Xie et al., NeurIPS 2021) is extended with a fixed bank of text embeddings
of land-cover concepts. Per pixel, the fused visual feature is projected into the text space and its
cosine similarity to every concept is concatenated to the features before the final fusion.

Shapes (B batch, H×W input pixels, C_i backbone channels, N concepts, D text dimension, K classes):

    features_i   (B, C_i, H/2^(i+1), W/2^(i+1))   i = 1..4, strides 4, 8, 16, 32
    F            (B, 4·256, H/4, W/4)           each stage → 1×1 conv+BN+ReLU → 256, resized, concatenated
    P            (B, D, H/4, W/4)               1×1 conv+BN+ReLU on F, then L2-normalised per pixel (eps)
    T            (N, D)                         text bank, rows L2-normalised, frozen (a buffer)
    S            (B, N, H/4, W/4)               S[b, n, y, x] = <P[b, :, y, x], T[n]>  (cosine map)
    G            (B, 256, H/4, W/4)             1×1 conv+BN+ReLU on concat[F, S]
    logits       (B, K, H/4, W/4)               1×1 conv on Dropout2d(0.1)(G)

With ``text_bank=None`` the head is the plain SegFormer head (the ablation baseline).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence
import torch
import torch.nn.functional as F
from torch import nn
from core.model.backbones import build_encoder

NORM_EPS = 1e-6


class ConvBNReLU(nn.Sequential):
    """k×k convolution (no bias) + BatchNorm + ReLU, as mmsegmentation's ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ConcatConvBNReLU(ConvBNReLU):
    """A 1×1 ConvBNReLU on the channel concatenation of maps at several strides, each bilinearly upsampled
    to ``size`` — computed without building the concatenation: a 1×1 convolution and bilinear upsampling
    are linear on different axes and commute, so ``W · concat(up(x_1), …, up(x_n)) = Σ_i up(W_i · x_i)``
    with ``W_i`` the columns of ``W`` for ``x_i``'s channels (exact up to float rounding). Each slice runs
    at its map's own stride and the wide stride-4 concatenation (and its gradient) never exists: a memory
    win of the head (issue 11, item 3). Same parameters (and state-dict keys) as :class:`ConvBNReLU`.

    ``forward(parts, size)``: ``parts`` float (B, C_i, H_i, W_i) whose channels add up to ``in_channels``,
    ``size`` (H, W) → (B, out_channels, H, W).
    """

    def forward(self, parts: Sequence[torch.Tensor], size) -> torch.Tensor:  # noqa: D102
        conv, bn, relu = self[0], self[1], self[2]
        if sum(x.shape[1] for x in parts) != conv.in_channels:
            raise ValueError(f"the parts hold {sum(x.shape[1] for x in parts)} channels; the conv reads "
                             f"{conv.in_channels}")
        acc, c0 = None, 0
        for x in parts:
            y = F.conv2d(x, conv.weight[:, c0:c0 + x.shape[1]])
            c0 += x.shape[1]
            if y.shape[-2:] != tuple(size):
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            acc = y if acc is None else acc + y
        return relu(bn(acc))

    def reference(self, parts: Sequence[torch.Tensor], size) -> torch.Tensor:
        """The same map the textbook way — upsample, concatenate, convolve (a test oracle; no hooks run)."""
        ups = [x if x.shape[-2:] == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
               for x in parts]
        return nn.Sequential.forward(self, torch.cat(ups, dim=1))


class SRMFHead(nn.Module):
    """SRMF decode head: SegFormer's all-MLP head plus the text–visual fusion (paper, Sec. III-D).

    Args:
        in_channels: channels of the four backbone stages (strides 4, 8, 16, 32).
        num_classes: K, the number of output classes.
        text_bank: float32 (N, D) text embeddings (rows are L2-normalised here again), or ``None``
            for the plain SegFormer head.
        channels: width of the per-stage branches and of the fused map (256 in the paper).
        dropout: Dropout2d probability before the classifier (0.1).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, text_bank: Optional[torch.Tensor] = None,
                 channels: int = 256, dropout: float = 0.1):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"SRMFHead needs 4 backbone stages, got {len(in_channels)}")
        self.channels = channels
        self.branches = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels)
        fused_in = 4 * channels
        if text_bank is not None:
            if text_bank.ndim != 2:
                raise ValueError(f"text_bank must be (N, D), got shape {tuple(text_bank.shape)}")
            n_concepts, embed_dim = text_bank.shape
            self.projection = ConcatConvBNReLU(4 * channels, embed_dim, 1)
            # A buffer: saved in the model file, moved with .to(), never trained (paper: text side frozen).
            self.register_buffer("text_bank", F.normalize(text_bank.detach().float(), dim=1, eps=NORM_EPS))
            fused_in += n_concepts
        else:
            self.projection = None
            self.text_bank = None
        self.fusion = ConcatConvBNReLU(fused_in, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @property
    def uses_text_bank(self) -> bool:
        return self.text_bank is not None

    def forward_features(self, features: Sequence[torch.Tensor], reference: bool = False) -> Dict[str, torch.Tensor]:
        """The head's intermediate maps, all at stride 4 (paper, Sec. III-D).

        The projection and fusion convolutions read F = concat of the four branch maps upsampled to stride
        4; they are computed re-associated (:class:`ConcatConvBNReLU`), so F itself is never built.

        Args:
            features: four float tensors (B, C_i, H_i, W_i) at strides 4, 8, 16, 32.
            reference: the textbook formulation instead (F built, then convolved): a test oracle, which
                also returns F as ``"stages"`` (B, 1024, H/4, W/4).

        Returns:
            ``{"embedding": P (B, D, H/4, W/4) unit-norm per pixel, "similarity": S (B, N, H/4, W/4) in
            [-1, 1], "fused": G (B, 256, H/4, W/4)}``; without a text bank only "fused".
        """
        size = tuple(features[0].shape[-2:])
        branches = [branch(feat) for branch, feat in zip(self.branches, features)]
        result = {}
        if reference:
            result["stages"] = torch.cat([y if y.shape[-2:] == size else
                                          F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                                          for y in branches], dim=1)
        apply = (lambda block, parts: block.reference(parts, size)) if reference else \
            (lambda block, parts: block(parts, size))
        parts = list(branches)
        if self.text_bank is not None:
            embedding = F.normalize(apply(self.projection, branches), dim=1, eps=NORM_EPS)
            bank = self.text_bank.to(embedding.dtype)
            similarity = torch.einsum("bdhw,nd->bnhw", embedding, bank)
            result["embedding"] = embedding
            result["similarity"] = similarity
            parts.append(similarity)
        result["fused"] = apply(self.fusion, parts)
        return result

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits float (B, K, H/4, W/4) from the four stage features."""
        return self.classifier(self.dropout(self.forward_features(features)["fused"]))


class SRMFNet(nn.Module):
    """Backbone + SRMF head.

    ``forward(x)``: x float32 (B, 3, H, W), normalised with the model's mean/std, H and W multiples of
    32 → logits (B, K, H/4, W/4). Use :func:`upsample_logits` for full resolution.

    ``head_autocast``: None (the default), or ``(device_type, dtype)`` to run the decode head under
    ``torch.autocast`` while the encoder stays in its own precision (set by
    :func:`core.execution.precision_scope`; not part of the model file).
    """

    def __init__(self, backbone: str, num_classes: int, text_bank: Optional[torch.Tensor] = None,
                 channels: int = 256, dropout: float = 0.1, encoder_weights: Optional[str] = None):
        super().__init__()
        self.backbone_name = backbone
        self.encoder, stage_channels = build_encoder(backbone, encoder_weights)
        self.head = SRMFHead(stage_channels, num_classes, text_bank, channels=channels, dropout=dropout)
        self.head_autocast = None

    def stage_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.encoder(x)[-4:])

    def _head_context(self):
        if self.head_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.head_autocast[0], dtype=self.head_autocast[1])

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.stage_features(x)
        with self._head_context():
            return self.head.forward_features(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stage_features(x)
        with self._head_context():
            return self.head(features)


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) logits to ``size`` = (H, W), as mmsegmentation's ``resize``."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def architecture_config(model: SRMFNet) -> dict:
    """The JSON-able description of ``model`` stored in the model file's header."""
    head = model.head
    return {
        "name": "srmf" if head.uses_text_bank else "segformer",
        "backbone": model.backbone_name,
        "head_channels": head.channels,
        "dropout": float(head.dropout.p),
        "text_fusion": head.uses_text_bank,
    }


def build_from_config(arch: dict, num_classes: int, text_bank: Optional[torch.Tensor], in_bands: int = 3) -> SRMFNet:
    """Build an untrained :class:`SRMFNet` from a model file's ``architecture`` entry, its first convolution
    reading ``in_bands`` bands (the header's ``input.bands``; :func:`core.model.bands.widen_first_conv`).

    Raises:
        InputError: unknown backbone.
    """
    model = SRMFNet(
        arch["backbone"], num_classes,
        text_bank=text_bank if arch.get("text_fusion", True) else None,
        channels=int(arch.get("head_channels", 256)),
        dropout=float(arch.get("dropout", 0.1)),
    )
    if in_bands != 3:
        from core.model.bands import widen_first_conv

        widen_first_conv(model, in_bands)
    return model
