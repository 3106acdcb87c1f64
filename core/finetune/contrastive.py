"""Class-balanced contrastive regularisation of the pixel/region embeddings (an opt-in fine-tuning loss).

Transfer of the bootstrapping contrastive learning (BCL) of the music cold-start matcher (WWW'23
companion, arXiv 2308.02844, Sec. 2, "contrastive learning against power-law supervision"): under
long-tailed supervision the head classes dominate the representation gradient; an auxiliary InfoNCE
whose anchors are drawn *uniformly per class* gives every class present in a batch the same number of
anchors, so tail classes shape the embedding as much as head classes.

Here the embeddings are the SRMF head's fused map G (B, 256, H/4, W/4) — the features the classifier
reads (:meth:`core.network.SRMFHead.forward_features`, ``"fused"``) — L2-normalised per pixel. The loss
is the supervised InfoNCE of Khosla et al. (2020, "SupCon", the multi-positive form):

    L_i = - 1/|P(i)| Σ_{p ∈ P(i)} log( exp(z_i·z_p / τ) / Σ_{a ∈ A(i)} exp(z_i·z_a / τ) )

over anchors i; A(i) = every other anchor and every entry of the memory queue, P(i) ⊂ A(i) those of
the same class. Anchors without a positive are skipped. The loss is averaged per class, then over
classes (equal weight per class), and multiplied by ``weight``. Optional memory queue: per class, the
last ``queue_size`` anchor embeddings of earlier iterations (detached), so that small batches still
see positives and negatives of every class. ``level="region"`` adds region embeddings (the mean
embedding of each class in each image of the batch) as further anchors; ``"pixel"`` uses pixels only.

With ``weight == 0`` the regulariser is off: :meth:`ContrastiveRegulariser.forward` returns a constant
zero (no graph, no gradient), and :func:`core.finetune.loop.train_loop` does not even capture the features.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple
import torch
import torch.nn.functional as F
from torch import nn
from core.classtable import IGNORE
from core.losses import supcon_loss  # noqa: F401 - the loss lives on the floor (pretraining uses it too)

LEVELS = ("pixel", "region", "both")


def labels_at(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Labels (B, H, W) at the feature map's size (h, w) by nearest neighbour at the cell centres.

    For stride s = H / h the label of cell (i, j) is the label of pixel (s·i + s//2, s·j + s//2);
    returns int64 (B, h, w). The same when sizes match.
    """
    B, H, W = labels.shape
    h, w = size
    if (H, W) == (h, w):
        return labels.long()
    ys = ((torch.arange(h, device=labels.device) + 0.5) * H / h).long().clamp_max(H - 1)
    xs = ((torch.arange(w, device=labels.device) + 0.5) * W / w).long().clamp_max(W - 1)
    return labels[:, ys][:, :, xs].long()


def sample_anchors(labels: torch.Tensor, per_class: int, generator: Optional[torch.Generator] = None,
                   ignore_index: int = IGNORE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchors drawn uniformly per class: ``per_class`` positions of every class present.

    Within a class, positions are uniform over its pixels (without replacement when it has at least
    ``per_class`` pixels, with replacement otherwise), so each class present gets exactly ``per_class``
    anchors whatever its pixel count.

    Args:
        labels: int (B, h, w) class ids, ``ignore_index`` = not an anchor. per_class: >= 1.
        generator: a CPU torch generator (the draws are made on the CPU, reproducibly).

    Returns:
        ``(index int64 (N,) into labels.flatten(), cls int64 (N,))``, N = per_class × classes present,
        on ``labels``' device.
    """
    flat = labels.reshape(-1).cpu()
    valid = flat != ignore_index
    classes = torch.unique(flat[valid])
    idx, cls = [], []
    for c in classes.tolist():
        pos = torch.nonzero(flat == c).flatten()
        n = len(pos)
        if n >= per_class:
            pick = torch.randperm(n, generator=generator)[:per_class]
        else:
            pick = torch.randint(n, (per_class,), generator=generator)
        idx.append(pos[pick])
        cls.append(torch.full((per_class,), c, dtype=torch.int64))
    if not idx:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty.to(labels.device), empty.to(labels.device)
    return torch.cat(idx).to(labels.device), torch.cat(cls).to(labels.device)


def region_embeddings(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding of each class in each image: z (B, C, h, w) unit-norm, labels (B, h, w) →
    ``(regions float (R, C) unit norm, cls int64 (R,))``, one row per (image, class present)."""
    B, C = z.shape[:2]
    out, cls = [], []
    for b in range(B):
        lab = labels[b].reshape(-1)
        feat = z[b].reshape(C, -1)
        for c in torch.unique(lab[lab != ignore_index]).tolist():
            m = lab == c
            out.append(feat[:, m].mean(1))
            cls.append(c)
    if not out:
        return z.new_zeros((0, C)), torch.zeros(0, dtype=torch.int64, device=z.device)
    return F.normalize(torch.stack(out), dim=1, eps=1e-6), torch.tensor(cls, dtype=torch.int64, device=z.device)


class ContrastiveRegulariser(nn.Module):
    """The class-balanced InfoNCE regulariser (BCL transfer) on fused features.

    Args:
        num_classes: K (labels 0..K-1; 255 ignored).
        weight: multiplies the loss; 0 disables it (forward returns a constant zero).
        temperature: τ (0.1 by default, SupCon's).
        anchors_per_class: anchors drawn per class present in the batch.
        queue_size: per-class memory queue length (0: none).
        level: ``"pixel"``, ``"region"`` (per-image class means) or ``"both"``.

    Call: ``reg(features float (B, C, h, w), labels int (B, H, W), generator) -> loss scalar``
    (already multiplied by ``weight``); ``reg.last`` holds the unweighted value and the anchor count.

    Raises:
        ValueError: a negative weight, τ <= 0, anchors_per_class < 2, queue_size < 0, unknown level.
    """

    def __init__(self, num_classes: int, weight: float = 0.1, temperature: float = 0.1,
                 anchors_per_class: int = 64, queue_size: int = 0, level: str = "pixel"):
        super().__init__()
        if weight < 0:
            raise ValueError(f"contrastive weight must be >= 0 (got {weight})")
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0 (got {temperature})")
        if anchors_per_class < 2:
            raise ValueError(f"anchors per class must be at least 2 (got {anchors_per_class})")
        if queue_size < 0:
            raise ValueError(f"queue size must be >= 0 (got {queue_size})")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)} (got {level!r})")
        self.num_classes = int(num_classes)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.anchors_per_class = int(anchors_per_class)
        self.queue_size = int(queue_size)
        self.level = level
        self.queue: Optional[torch.Tensor] = None  # (K, queue_size, C), lazily on the features' device
        self.queue_fill = torch.zeros(self.num_classes, dtype=torch.int64)
        self.queue_ptr = torch.zeros(self.num_classes, dtype=torch.int64)
        self.last = {"loss": 0.0, "anchors": 0}

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def queue_state(self) -> Dict[str, torch.Tensor]:
        """The memory queue as CPU tensors, for a training checkpoint: ``queue`` float32 (K, queue_size, C),
        ``fill`` and ``ptr`` int64 (K,); an empty dict while there is no queue (``queue_size`` 0 or nothing
        enqueued yet)."""
        if self.queue is None:
            return {}
        return {"queue": self.queue.detach().cpu().contiguous(), "fill": self.queue_fill.clone(),
                "ptr": self.queue_ptr.clone()}

    def load_queue_state(self, state: Dict[str, torch.Tensor], device=None) -> None:
        """Restore what :meth:`queue_state` returned (an empty dict leaves the queue empty).

        Raises:
            ValueError: the saved queue has another class count or queue length.
        """
        if not state:
            return
        q = state["queue"]
        if q.dim() != 3 or q.shape[0] != self.num_classes or q.shape[1] != self.queue_size:
            raise ValueError(f"saved contrastive queue {tuple(q.shape)} does not fit {self.num_classes} classes x "
                             f"{self.queue_size} entries")
        self.queue = q.to(device) if device is not None else q.clone()
        self.queue_fill = state["fill"].to(torch.int64).clone()
        self.queue_ptr = state["ptr"].to(torch.int64).clone()

    def _bank(self):
        if self.queue is None or int(self.queue_fill.sum()) == 0:
            return None, None
        rows, cls = [], []
        for c in range(self.num_classes):
            n = int(self.queue_fill[c])
            if n:
                rows.append(self.queue[c, :n])
                cls.append(torch.full((n,), c, dtype=torch.int64, device=self.queue.device))
        return torch.cat(rows), torch.cat(cls)

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, cls: torch.Tensor) -> None:
        if self.queue_size == 0 or not len(z):
            return
        if self.queue is None or self.queue.device != z.device or self.queue.shape[-1] != z.shape[1]:
            self.queue = torch.zeros((self.num_classes, self.queue_size, z.shape[1]), device=z.device)
            self.queue_fill.zero_()
            self.queue_ptr.zero_()
        for c in torch.unique(cls).tolist():
            if not 0 <= c < self.num_classes:
                continue
            rows = z[cls == c][-self.queue_size:].detach().float()
            for r in rows:  # a ring buffer per class
                p = int(self.queue_ptr[c])
                self.queue[c, p] = r
                self.queue_ptr[c] = (p + 1) % self.queue_size
                self.queue_fill[c] = min(self.queue_size, int(self.queue_fill[c]) + 1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if not self.enabled:
            self.last = {"loss": 0.0, "anchors": 0}
            return torch.zeros((), device=features.device)
        z = F.normalize(features.float(), dim=1, eps=1e-6)
        lab = labels_at(labels, tuple(z.shape[-2:]))
        anchors, cls = [], []
        if self.level in ("pixel", "both"):
            idx, c = sample_anchors(lab, self.anchors_per_class, generator)
            if len(idx):
                B, C, h, w = z.shape
                flat = z.permute(0, 2, 3, 1).reshape(-1, C)
                anchors.append(flat[idx])
                cls.append(c)
        if self.level in ("region", "both"):
            r, c = region_embeddings(z, lab)
            anchors.append(r)
            cls.append(c)
        if not anchors or sum(len(a) for a in anchors) == 0:
            self.last = {"loss": 0.0, "anchors": 0}
            return z.sum() * 0.0
        a = torch.cat(anchors)
        ac = torch.cat(cls)
        bank, bank_cls = self._bank()
        loss, used = supcon_loss(a, ac, self.temperature, bank, bank_cls)
        self._enqueue(a, ac)
        self.last = {"loss": float(loss.detach()), "anchors": used}
        return loss * self.weight


class FeatureCapture:
    """Captures a module's output during a forward pass (a forward hook), e.g. the SRMF head's
    ``fusion`` block whose output is the fused map G — so the training loop can keep calling the
    (possibly DistributedDataParallel-wrapped) network as usual. Use as a context manager."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.output: Optional[torch.Tensor] = None
        self._handle = None

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module, inputs, output):
        self.output = output

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.output = None
        return False
