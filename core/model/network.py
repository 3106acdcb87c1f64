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
            self.projection = ConvBNReLU(4 * channels, embed_dim, 1)
            # A buffer: saved in the model file, moved with .to(), never trained (paper: text side frozen).
            self.register_buffer("text_bank", F.normalize(text_bank.detach().float(), dim=1, eps=NORM_EPS))
            fused_in += n_concepts
        else:
            self.projection = None
            self.text_bank = None
        self.fusion = ConvBNReLU(fused_in, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @property
    def uses_text_bank(self) -> bool:
        return self.text_bank is not None

    def forward_features(self, features: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The head's intermediate maps, all at stride 4.

        Args:
            features: four float tensors (B, C_i, H_i, W_i) at strides 4, 8, 16, 32.

        Returns:
            ``{"stages": F (B, 1024, H/4, W/4), "embedding": P (B, D, H/4, W/4) unit-norm per pixel,
            "similarity": S (B, N, H/4, W/4) in [-1, 1], "fused": G (B, 256, H/4, W/4)}``; without a
            text bank only "stages" and "fused".
        """
        size = features[0].shape[-2:]
        outs = []
        for branch, feat in zip(self.branches, features):
            y = branch(feat)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        stages = torch.cat(outs, dim=1)
        result = {"stages": stages}
        if self.text_bank is not None:
            embedding = F.normalize(self.projection(stages), dim=1, eps=NORM_EPS)
            bank = self.text_bank.to(embedding.dtype)
            similarity = torch.einsum("bdhw,nd->bnhw", embedding, bank)
            result["embedding"] = embedding
            result["similarity"] = similarity
            stages = torch.cat([stages, similarity], dim=1)
        result["fused"] = self.fusion(stages)
        return result

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits float (B, K, H/4, W/4) from the four stage features."""
        return self.classifier(self.dropout(self.forward_features(features)["fused"]))


class SRMFNet(nn.Module):
    """Backbone + SRMF head.

    ``forward(x)``: x float32 (B, 3, H, W), normalised with the model's mean/std, H and W multiples of
    32 → logits (B, K, H/4, W/4). Use :func:`upsample_logits` for full resolution.
    """

    def __init__(self, backbone: str, num_classes: int, text_bank: Optional[torch.Tensor] = None,
                 channels: int = 256, dropout: float = 0.1, encoder_weights: Optional[str] = None):
        super().__init__()
        self.backbone_name = backbone
        self.encoder, stage_channels = build_encoder(backbone, encoder_weights)
        self.head = SRMFHead(stage_channels, num_classes, text_bank, channels=channels, dropout=dropout)

    def stage_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.encoder(x)[-4:])

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.head.forward_features(self.stage_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage_features(x))


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


def build_from_config(arch: dict, num_classes: int, text_bank: Optional[torch.Tensor]) -> SRMFNet:
    """Build an untrained :class:`SRMFNet` from a model file's ``architecture`` entry.

    Raises:
        InputError: unknown backbone.
    """
    return SRMFNet(
        arch["backbone"], num_classes,
        text_bank=text_bank if arch.get("text_fusion", True) else None,
        channels=int(arch.get("head_channels", 256)),
        dropout=float(arch.get("dropout", 0.1)),
    )
