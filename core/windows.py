"""The sliding window shared by segmentation, validation and findclass (SRMF inference, DESIGN.md): the
slide plan, the window predictor, strip streaming with a bounded logit accumulator, the in-memory reference."""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from core.errors import InputError

RowsCallback = Callable[[int, "RowBlock"], None]


def window_offsets(size: int, window: int, stride: int) -> List[int]:
    """Offsets (pixels) of the windows along one axis, as mmsegmentation's ``slide_inference``.

    ``n = ceil((size - window) / stride) + 1`` windows at ``i * stride``, the last one moved back to
    end at ``size``; one window at 0 when ``size <= window`` (it is padded).
    """
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


def validate_window(window: int, stride: int) -> None:
    """Raise InputError unless 32 <= window, window % 32 == 0 and 1 <= stride <= window."""
    if not isinstance(window, int) or window < 32 or window % 32:
        raise InputError(f"--window must be a multiple of 32 pixels, at least 32 (got {window})")
    if not isinstance(stride, int) or stride < 1 or stride > window:
        raise InputError(f"--stride must be between 1 and the window ({window}) pixels (got {stride})")


class WindowPredictor:
    """Runs the network on batches of windows and returns full-resolution logits.

    On CUDA: pinned host memory, non-blocking copies and bf16 (or fp16) autocast; logits come back
    as float32. Call: float32 (B, 3, window, window), normalised → float32 (B, K, window, window) on
    the compute device.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, amp: bool = True):
        self.model = model.eval().to(device)
        self.device = device
        self.cuda = device.type == "cuda"
        self.amp_dtype = None
        if self.cuda and amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            logits = self.model(batch)
        logits = logits.float()
        return F.interpolate(logits, size=batch.shape[-2:], mode="bilinear", align_corners=False)


def normalise(data: np.ndarray, valid: Optional[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std per band of (n, rows, cols) data → a new float32 array; nodata pixels set to 0
    (the mean, so they add nothing to their neighbours)."""
    out = data.astype(np.float32)  # always a copy: strips stay in their raw (often uint8) type
    out -= np.asarray(mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(std, dtype=np.float32)[:, None, None]
    if valid is not None:
        out[:, ~valid] = 0.0
    return out


@dataclass
class Window:
    x: int
    y: int
    w: int
    h: int


def _batched(items: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _window_tensor(strip: np.ndarray, valid: Optional[np.ndarray], wins: Sequence[Window], y0: int, window: int,
                   mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Windows cut from a raw strip (rows from ``y0``), normalised, stacked into (B, n, window, window)
    float32, zero-padded (in normalised units) where the raster is smaller than the window."""
    n = strip.shape[0]
    out = torch.zeros((len(wins), n, window, window), dtype=torch.float32)
    for i, w in enumerate(wins):
        rows, cols = slice(w.y - y0, w.y - y0 + w.h), slice(w.x, w.x + w.w)
        tile = normalise(strip[:, rows, cols], None if valid is None else valid[rows, cols], mean, std)
        out[i, :, :w.h, :w.w] = torch.from_numpy(tile)
    return out


class RowBlock:
    """Finished rows of the accumulator: ``acc`` float32 (K, rows, width) logit sums and ``cnt``
    float32 (rows, width) window counts, on the compute device; ``valid`` bool (rows, width) or None."""

    def __init__(self, acc: torch.Tensor, cnt: torch.Tensor, valid: Optional[np.ndarray]):
        self.acc, self.cnt, self.valid = acc, cnt, valid

    def logits(self) -> torch.Tensor:
        """Averaged logits float32 (K, rows, width); NaN where no window voted (all nodata)."""
        return self.acc / self.cnt

    def classes(self) -> torch.Tensor:
        """uint8 (rows, width) class ids; 255 where nodata or never covered."""
        v = None if self.valid is None else torch.from_numpy(self.valid).to(self.acc.device)
        return classes_from_accumulator(self.acc, self.cnt, v)


class SlidePlan:
    """The window grid of a raster: rows of windows, in the order both engines process them."""

    def __init__(self, height: int, width: int, window: int, stride: int):
        self.height, self.width, self.window, self.stride = height, width, window, stride
        self.win_h, self.win_w = min(window, height), min(window, width)
        self.ys = window_offsets(height, window, stride)
        self.xs = window_offsets(width, window, stride)

    @property
    def n_windows(self) -> int:
        return len(self.ys) * len(self.xs)

    def row(self, y: int) -> List[Window]:
        return [Window(x, y, self.win_w, self.win_h) for x in self.xs]


def _active(row: List[Window], valid: Optional[np.ndarray], y0: int) -> List[Window]:
    """Windows of a row that hold at least one valid pixel (all of them when there is no nodata)."""
    if valid is None:
        return row
    return [w for w in row if valid[w.y - y0:w.y - y0 + w.h, w.x:w.x + w.w].any()]


def stream_segmentation(read_strip: Callable[[int, int], Tuple[np.ndarray, Optional[np.ndarray]]],
                        plan: SlidePlan, predictor: WindowPredictor, num_classes: int,
                        mean: Sequence[float], std: Sequence[float], batch_size: int,
                        on_rows: RowsCallback, progress: Optional[Callable[[float], None]] = None,
                        prefetch: bool = True) -> dict:
    """Sliding-window inference, strip by strip, handing each block of finished rows to ``on_rows``.

    Args:
        read_strip: ``(y0, rows) -> (data (n, rows, width) in the model's value range, uint8 or
            float32; valid bool (rows, width) or None)``.
        plan: the window grid.
        predictor: the network on its device.
        num_classes: K.
        mean, std: the model's normalisation (value-range units).
        batch_size: windows per forward pass (windows of one strip row are batched together).
        on_rows: ``on_rows(y0, block)`` with a :class:`RowBlock` of the rows ``y0 ..`` that no later
            window covers (its tensors are reused afterwards: copy what you keep).
        progress: called with the fraction of windows done.
        prefetch: read the next strip in a background thread while the current one is computed.

    Memory: the accumulator K × window × width float32 on the device, two raw strips, one batch.

    Returns:
        ``{"windows": total, "skipped_windows": n, "forward_seconds": s}``.
    """
    device = predictor.device
    K, W, win_h = num_classes, plan.width, plan.win_h
    acc = torch.zeros((K, win_h, W), dtype=torch.float32, device=device)
    cnt = torch.zeros((win_h, W), dtype=torch.float32, device=device)
    done = skipped = 0
    forward_s = 0.0
    ys = plan.ys
    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
    try:
        pending = pool.submit(read_strip, ys[0], win_h) if pool else None
        for r, y in enumerate(ys):
            if pool:
                data, valid = pending.result()
                if r + 1 < len(ys):
                    pending = pool.submit(read_strip, ys[r + 1], win_h)
            else:
                data, valid = read_strip(y, win_h)
            row = plan.row(y)
            active = _active(row, valid, y)
            skipped += len(row) - len(active)
            for chunk in _batched(active, batch_size):
                t0 = time.perf_counter()
                logits = predictor(_window_tensor(data, valid, chunk, y, plan.window, mean, std))
                for i, w in enumerate(chunk):
                    acc[:, :w.h, w.x:w.x + w.w] += logits[i, :, :w.h, :w.w]
                    cnt[:w.h, w.x:w.x + w.w] += 1.0
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                forward_s += time.perf_counter() - t0
                done += len(chunk)
                if progress:
                    progress((done + skipped) / plan.n_windows)
            if not active and progress:
                progress((done + skipped) / plan.n_windows)
            # Rows [y, next_y) are covered by no later window: finish and hand them over.
            next_y = ys[r + 1] if r + 1 < len(ys) else plan.height
            n_done = next_y - y
            on_rows(y, RowBlock(acc[:, :n_done], cnt[:n_done], None if valid is None else valid[:n_done]))
            del data, valid
            if r + 1 < len(ys):
                keep = win_h - n_done
                if n_done >= keep:  # source and target rows do not overlap: copy in place
                    acc[:, :keep].copy_(acc[:, n_done:])
                    cnt[:keep].copy_(cnt[n_done:])
                else:
                    acc[:, :keep] = acc[:, n_done:].clone()
                    cnt[:keep] = cnt[n_done:].clone()
                acc[:, keep:] = 0.0
                cnt[keep:] = 0.0
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return {"windows": plan.n_windows, "skipped_windows": skipped, "forward_seconds": forward_s}


def slide_inference_in_memory(image: np.ndarray, valid: Optional[np.ndarray], plan: SlidePlan,
                              predictor: WindowPredictor, num_classes: int, mean: Sequence[float],
                              std: Sequence[float], batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: the whole image in memory and one full logit tensor (naive accumulator).

    Same windows, order and batches as :func:`stream_segmentation`, so results are comparable bit for
    bit. Memory grows with the raster: use it for tests, benchmarks and small validation images.

    Args:
        image: (n, H, W) in the model's value range (uint8 or float32); valid: bool (H, W) or None.

    Returns:
        ``(logits float32 (K, H, W) averaged, NaN where no window voted; classes uint8 (H, W), 255 = nodata)``.
    """
    K, H, W = num_classes, plan.height, plan.width
    acc = torch.zeros((K, H, W), dtype=torch.float32, device=predictor.device)
    cnt = torch.zeros((H, W), dtype=torch.float32, device=predictor.device)
    for y in plan.ys:
        row = plan.row(y)
        strip_valid = None if valid is None else valid[y:y + plan.win_h]
        active = _active(row, strip_valid, y)
        for chunk in _batched(active, batch_size):
            logits = predictor(_window_tensor(image[:, y:y + plan.win_h], strip_valid, chunk, y, plan.window,
                                              mean, std))
            for i, w in enumerate(chunk):
                acc[:, w.y:w.y + w.h, w.x:w.x + w.w] += logits[i, :, :w.h, :w.w]
                cnt[w.y:w.y + w.h, w.x:w.x + w.w] += 1.0
    block = RowBlock(acc, cnt, valid)
    return block.logits(), block.classes()


def classes_from_accumulator(acc: torch.Tensor, cnt: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """argmax over classes of (K, rows, cols) logit sums → uint8 (rows, cols); 255 where invalid or
    never covered. The sum's argmax is the mean's (the count is positive), without a K×rows×cols copy."""
    classes = acc.argmax(0).to(torch.uint8)
    nodata = cnt <= 0
    if valid is not None:
        nodata |= ~valid
    classes[nodata] = 255
    return classes


def load_job_model(model, window: Optional[int], stride: Optional[int], rep, untrained_note: str):
    """The model of a job (a path, a LoadedModel, or None = the embedded default) and its window/stride.

    Warns through ``rep`` when the model is an untrained placeholder; window/stride default to the
    model's (the stride never exceeds the window).

    Returns:
        ``(LoadedModel, window, stride)`` in pixels.
    Raises:
        ModelFileError: an unusable model file; InputError: an invalid window/stride.
    """
    from core.model.modelfile import DEFAULT_MODEL_PATH, LoadedModel, load_model

    lm = model if isinstance(model, LoadedModel) else load_model(model or DEFAULT_MODEL_PATH, device="cpu")
    if lm.untrained:
        rep.warning(f"The model {lm.path.name} is an UNTRAINED PLACEHOLDER: {untrained_note}")
    inference = lm.header["inference"]
    window = int(inference["window"] if window is None else window)
    stride = int(min(inference["stride"], window) if stride is None else stride)
    validate_window(window, stride)
    return lm, window, stride
