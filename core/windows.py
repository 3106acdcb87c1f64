"""The sliding window shared by segmentation, validation and findclass (SRMF inference, DESIGN.md): the
slide plan, the one iterator of window rows and batches, the window predictor, strip streaming with a bounded
logit accumulator, the in-memory reference, and the inference job's preamble (raster, model, device, plan)."""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from core.device import DEFAULT_BATCH, resolve_device
from core.execution import NetworkRunner
from core.errors import InputError
from core.model.modelfile import DEFAULT_INFERENCE

RowsCallback = Callable[[int, "RowBlock"], None]
StripReadFn = Callable[[int, int], Tuple[np.ndarray, Optional[np.ndarray]]]


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


class WindowPredictor(NetworkRunner):
    """Runs the network on batches of windows and returns full-resolution logits.

    Model and batches in channels_last memory; the job's precision (:mod:`core.execution`: float32, or
    bf16 autocast where native, guarded on the first batch for ``auto``); on CUDA pinned host memory and
    non-blocking copies. Logits come back as float32. Call: float32 (B, 3, window, window), normalised →
    float32 (B, K, window, window) on the compute device.

    Args: as :class:`core.execution.NetworkRunner`; ``precision`` defaults to float32, the exact path (a
        guarded ``auto`` predictor runs its first call in float32 and later ones in bf16). ``tta``:
        test-time augmentation — each window is also run flipped and rotated (:data:`TTA_TRANSFORMS`, the
        8 symmetries of the square) and the full-resolution logits, mapped back, are averaged (8 times the
        forward passes).
    """

    def __init__(self, model, device, precision="fp32", log=None, tta: bool = False):
        super().__init__(model, device, precision, log)
        self.tta = bool(tta)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = self._input(batch)
        if not self.tta:
            logits = self.run(lambda: self.model(batch).float(), lambda out: out.argmax(1))
            return F.interpolate(logits, size=batch.shape[-2:], mode="bilinear", align_corners=False)
        return self.run(lambda: self._augmented(batch), lambda out: out.argmax(1))

    def _augmented(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean of the full-resolution logits over :data:`TTA_TRANSFORMS` (each undone before averaging)."""
        total = None
        for k, flip in TTA_TRANSFORMS:
            x = torch.rot90(batch, k, dims=(2, 3))
            x = torch.flip(x, dims=(3,)) if flip else x
            out = F.interpolate(self.model(x).float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
            out = torch.flip(out, dims=(3,)) if flip else out
            out = torch.rot90(out, -k, dims=(2, 3))
            total = out if total is None else total.add_(out)
        return total / len(TTA_TRANSFORMS)


TTA_TRANSFORMS = [(k, flip) for flip in (False, True) for k in range(4)]
"""Test-time augmentation: ``(quarter turns, horizontal flip)`` — the dihedral group of the square, the
identity first. Windows are square (a raster smaller than a window is padded), so rotations keep the shape."""


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
    """A window of a :class:`SlidePlan`: top-left ``x``, ``y`` and size ``w`` x ``h`` in raster pixels
    (``w``, ``h`` under the window size only where the raster is smaller)."""

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
    float32 in channels_last memory (the network's layout), zero-padded (in normalised units) where the raster is smaller than the window."""
    n = strip.shape[0]
    out = torch.zeros((len(wins), window, window, n), dtype=torch.float32).permute(0, 3, 1, 2)  # channels_last
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
        """Windows in the plan: rows × columns."""
        return len(self.ys) * len(self.xs)

    def row(self, y: int) -> List[Window]:
        """The windows of the row of windows at offset ``y`` (pixels), left to right."""
        return [Window(x, y, self.win_w, self.win_h) for x in self.xs]


def _active(row: List[Window], valid: Optional[np.ndarray], y0: int) -> List[Window]:
    """Windows of a row that hold at least one valid pixel (all of them when there is no nodata)."""
    if valid is None:
        return row
    return [w for w in row if valid[w.y - y0:w.y - y0 + w.h, w.x:w.x + w.w].any()]


@dataclass
class WindowBatch:
    """Up to ``batch_size`` windows of one row: ``windows``; ``tensor`` float32 (B, n, window, window),
    normalised, zero-padded; ``seconds`` spent cutting and normalising it."""

    windows: Sequence[Window]
    tensor: torch.Tensor
    seconds: float


@dataclass
class StripRow:
    """One row of windows of a :class:`SlidePlan` and its strip, as :func:`iter_window_rows` yields it.

    Attributes:
        index: the row's position in ``plan.ys``. y: its first raster row (pixels). next_y: the first
            row of the next row of windows (``plan.height`` for the last): rows ``y .. next_y`` are
            covered by no later window.
        windows: every window of the row. active: those that are run (valid pixels, wanted); empty
            when the strip was not read (no window wanted).
        data: the raw strip (n, win_h, width) or None (not read); valid: bool (win_h, width) or None.
    """

    index: int
    y: int
    next_y: int
    windows: List[Window]
    active: List[Window]
    data: Optional[np.ndarray]
    valid: Optional[np.ndarray]
    window: int
    batch_size: int
    mean: Sequence[float]
    std: Sequence[float]

    def batches(self) -> Iterator[WindowBatch]:
        """The active windows in batches of ``batch_size``, each cut from the strip when it is asked for."""
        for chunk in _batched(self.active, self.batch_size):
            t0 = time.perf_counter()
            tensor = _window_tensor(self.data, self.valid, chunk, self.y, self.window, self.mean, self.std)
            yield WindowBatch(chunk, tensor, time.perf_counter() - t0)


def iter_window_rows(read_strip: StripReadFn, plan: SlidePlan, mean: Sequence[float], std: Sequence[float],
                     batch_size: int, want: Optional[Callable[[Window], bool]] = None,
                     prefetch: bool = True) -> Iterator[StripRow]:
    """The rows of windows of ``plan``, top to bottom, each with its strip read (the one iterator of
    window batches that segmentation and findclass share).

    Args:
        read_strip: ``(y0, rows) -> (data (n, rows, width) in the model's value range, uint8 or
            float32; valid bool (rows, width) or None)``; called with ``plan.win_h`` rows.
        plan: the window grid. mean, std: the model's normalisation (value-range units).
        batch_size: windows per :class:`WindowBatch`.
        want: ``want(window) -> bool`` keeps only some windows; a row with none wanted is not read.
            Windows that are entirely nodata are always left out.
        prefetch: read the next needed strip in a background thread while the current one is used.

    Yields:
        :class:`StripRow` per row of windows; its strip is released when the next row is asked for.
        Close the iterator (``contextlib.closing``) to stop the reader thread at once on an error.
    """
    ys = plan.ys
    needed = [y for y in ys if want is None or any(want(w) for w in plan.row(y))]
    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
    try:
        pending = pool.submit(read_strip, needed[0], plan.win_h) if pool and needed else None
        k = 0
        for r, y in enumerate(ys):
            next_y = ys[r + 1] if r + 1 < len(ys) else plan.height
            windows = plan.row(y)
            data = valid = None
            active: List[Window] = []
            if k < len(needed) and needed[k] == y:
                k += 1
                if pool:
                    data, valid = pending.result()
                    if k < len(needed):
                        pending = pool.submit(read_strip, needed[k], plan.win_h)
                else:
                    data, valid = read_strip(y, plan.win_h)
                active = _active(windows, valid, y)
                if want is not None:
                    active = [w for w in active if want(w)]
            row = StripRow(r, y, next_y, windows, active, data, valid, plan.window, batch_size, mean, std)
            del data, valid
            yield row
            row.data = row.valid = None  # the strip goes before the one after the next is read
            del row
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def stream_segmentation(read_strip: StripReadFn, plan: SlidePlan, predictor: WindowPredictor, num_classes: int,
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
    with contextlib.closing(iter_window_rows(read_strip, plan, mean, std, batch_size, prefetch=prefetch)) as rows:
        for row in rows:
            skipped += len(row.windows) - len(row.active)
            for batch in row.batches():
                t0 = time.perf_counter()
                _accumulate(acc, cnt, predictor(batch.tensor), batch.windows, row.y)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                forward_s += batch.seconds + (time.perf_counter() - t0)
                done += len(batch.windows)
                if progress:
                    progress((done + skipped) / plan.n_windows)
            if not row.active and progress:
                progress((done + skipped) / plan.n_windows)
            # Rows [y, next_y) are covered by no later window: finish and hand them over.
            n_done = row.next_y - row.y
            on_rows(row.y, RowBlock(acc[:, :n_done], cnt[:n_done], None if row.valid is None else row.valid[:n_done]))
            if row.index + 1 < len(plan.ys):
                _drop_rows(acc, cnt, n_done)
    return {"windows": plan.n_windows, "skipped_windows": skipped, "forward_seconds": forward_s}


def _accumulate(acc: torch.Tensor, cnt: torch.Tensor, logits: torch.Tensor, wins: Sequence[Window], y0: int) -> None:
    """Add a batch's logits (B, K, window, window) to the sums ``acc`` (K, rows, width) and the counts
    ``cnt`` (rows, width) whose first row is raster row ``y0``."""
    for i, w in enumerate(wins):
        rows, cols = slice(w.y - y0, w.y - y0 + w.h), slice(w.x, w.x + w.w)
        acc[:, rows, cols] += logits[i, :, :w.h, :w.w]
        cnt[rows, cols] += 1.0


def _drop_rows(acc: torch.Tensor, cnt: torch.Tensor, n_done: int) -> None:
    """Move the accumulator's rows after the first ``n_done`` to its top and zero the rest."""
    keep = acc.shape[1] - n_done
    if n_done >= keep:  # source and target rows do not overlap: copy in place
        acc[:, :keep].copy_(acc[:, n_done:])
        cnt[:keep].copy_(cnt[n_done:])
    else:
        acc[:, :keep] = acc[:, n_done:].clone()
        cnt[:keep] = cnt[n_done:].clone()
    acc[:, keep:] = 0.0
    cnt[keep:] = 0.0


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

    def read_strip(y0: int, rows: int):
        return image[:, y0:y0 + rows], None if valid is None else valid[y0:y0 + rows]

    for row in iter_window_rows(read_strip, plan, mean, std, batch_size, prefetch=False):
        for batch in row.batches():
            _accumulate(acc, cnt, predictor(batch.tensor), batch.windows, 0)
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
        ModelFileError: an unusable model file; InputError: an invalid window/stride, or a pretrained
            encoder whose head is untrained (``python -m core pretrain``'s output: fine-tune it first).
    """
    from core.model.modelfile import DEFAULT_MODEL_PATH, LoadedModel, load_model

    lm = model if isinstance(model, LoadedModel) else load_model(model or DEFAULT_MODEL_PATH, device="cpu")
    if lm.head_untrained:
        raise InputError(f"The model {lm.path.name} is a self-supervised pretrained encoder with an untrained "
                         "decode head: it maps no classes. Fine-tune it on labels first "
                         f"(python -m core finetune --base-model {lm.path.name} ...), then use the fine-tuned model")
    if lm.untrained:
        rep.warning(f"The model {lm.path.name} is an UNTRAINED PLACEHOLDER: {untrained_note}")
    inference = lm.header["inference"]
    window = int(inference["window"] if window is None else window)
    stride = int(min(inference["stride"], window) if stride is None else stride)
    validate_window(window, stride)
    return lm, window, stride


def check_inference_args(window: Optional[int], stride: Optional[int], batch_size: Optional[int],
                         precision: Optional[str] = None) -> None:
    """Fail at once, before the raster or the model is opened, on a window/stride/batch size given wrong.

    A window or stride left out is checked with the default model's (:data:`DEFAULT_INFERENCE`).

    Raises:
        InputError: see :func:`validate_window`; ``batch_size`` under 1 or not an int; ``precision`` not one
            of :data:`core.execution.PRECISIONS`.
    """
    from core.execution import PRECISIONS

    if precision is not None and str(precision).strip().lower() not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if window is not None or stride is not None:
        default_stride = DEFAULT_INFERENCE["stride"]
        validate_window(window if window is not None else DEFAULT_INFERENCE["window"],
                        stride if stride is not None else min(default_stride, window or default_stride))
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")


@dataclass
class InferenceJob:
    """What a sliding-window job runs on (:func:`open_inference`).

    Attributes:
        ds: the GDAL dataset; path: its name as given. lm: the LoadedModel. device: the torch device.
        window, stride: pixels. bands: 1-based input bands in the model's order. batch: windows per
        forward pass. plan: the raster's :class:`SlidePlan`. precision: the resolved
        :class:`core.execution.Precision`.
    """

    ds: object
    path: object
    lm: object
    device: torch.device
    window: int
    stride: int
    bands: List[int]
    batch: int
    plan: SlidePlan
    precision: object

    @property
    def input(self) -> dict:
        """The model header's ``input`` (bands, scaling, value_range, mean, std)."""
        return self.lm.header["input"]

    def strip_reader(self, rep):
        """The raster's :class:`core.geo.raster.StripReader` with the model's scaling (its notes logged)."""
        from core.geo.raster import StripReader, compute_scaling

        inp = self.input
        scaling = compute_scaling(self.ds, self.bands, inp["scaling"], inp["value_range"], name=self.path)
        for note in scaling.notes:
            rep.log("scaling: " + note)
        return StripReader(self.ds, self.bands, scaling, name=self.path)


def _log_band_use(ds, path, band_list: Sequence[int], rep) -> None:
    """Say which bands are not read (a 4th band is not silently dropped) and that NaN/±inf are nodata."""
    from osgeo import gdal
    from core.geo.raster import FLOAT_TYPES

    ignored = [b for b in range(1, ds.RasterCount + 1) if b not in band_list  # an alpha band is a mask: used
               and ds.GetRasterBand(b).GetColorInterpretation() != gdal.GCI_AlphaBand]
    if ignored:
        rep.log(f"{path}: band{'s' if len(ignored) > 1 else ''} {', '.join(map(str, ignored))} of {ds.RasterCount} "
                f"not used: the model reads bands {', '.join(map(str, band_list))} (choose others with --bands)",
                "warning")
    if any(ds.GetRasterBand(b).DataType in FLOAT_TYPES for b in set(band_list)):
        rep.log(f"{path}: float bands: NaN and ±inf pixels are nodata")


def open_inference(ds, path, model, *, window: Optional[int], stride: Optional[int], batch_size: Optional[int],
                   device: str, bands: Optional[Sequence[int]], rep, untrained_note: str,
                   precision: Optional[str] = "auto") -> InferenceJob:
    """The preamble of a sliding-window job on an opened raster ``ds`` (named ``path`` in messages): the
    device, the model and its window/stride (:func:`load_job_model`), the bands, the batch size (when None: on a
    CPU from the free memory, :func:`core.execution.cpu_batch_size`; else the device's default), the precision (:func:`core.execution.resolve_precision`) and the slide plan.

    Raises:
        InputError: an unusable device, precision, bands or window/stride; ModelFileError: an unusable model file.
    """
    from core.execution import resolve_precision
    from core.geo.raster import select_bands

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    lm, window, stride = load_job_model(model, window, stride, rep, untrained_note)
    band_list = select_bands(ds, path, bands, lm.header["input"]["bands"])
    _log_band_use(ds, path, band_list, rep)
    batch = batch_size
    if batch is None and dev.type == "cpu":
        from core.execution import cpu_batch_size

        batch, note = cpu_batch_size(window, lm.header["architecture"]["backbone"], prec)
        rep.log("windows per batch: " + note)
    batch = int(DEFAULT_BATCH.get(dev.type, 4) if batch is None else batch)
    plan = SlidePlan(ds.RasterYSize, ds.RasterXSize, window, stride)
    return InferenceJob(ds, path, lm, dev, window, stride, band_list, batch, plan, prec)
