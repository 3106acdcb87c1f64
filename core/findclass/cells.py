"""Feature cells of findclass: the 4 x 4-pixel cell grid of a raster, the features of the model's head
(fused / text-aligned embedding) per cell, sampled inside polygons or streamed over the whole raster."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Optional, Sequence, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from core.errors import InputError
from core.findclass.params import CELL, FEATURE_SPACES
from core.model.modelfile import DEFAULT_INFERENCE
from core.execution import NetworkRunner
from core.windows import StripRow, iter_window_rows


# -- the cell grid ---------------------------------------------------------------------------------------
class CellGrid:
    """The stride-4 grid of a raster: ``rows = ceil(H / 4)``, ``cols = ceil(W / 4)``; cell (r, c) covers
    pixels [4r, 4r+4) x [4c, 4c+4), clipped to the raster; its centre is the centre of its pixels inside
    the raster (pixel units, pixel (0, 0)'s centre at 0.0)."""

    def __init__(self, height: int, width: int, cell: int = CELL):
        self.height, self.width, self.cell = int(height), int(width), int(cell)
        self.rows = -(-self.height // cell)
        self.cols = -(-self.width // cell)
        self.cy = self._centres(self.rows, self.height)
        self.cx = self._centres(self.cols, self.width)

    def _centres(self, n: int, size: int) -> np.ndarray:
        start = np.arange(n, dtype=np.float64) * self.cell
        end = np.minimum(start + self.cell, size)
        return (start + end) / 2.0 - 0.5

    def geotransform(self, gt: Sequence[float]) -> Tuple[float, ...]:
        """The raster's geotransform scaled to the cell grid (same origin, pixel size × 4)."""
        c = self.cell
        return (gt[0], gt[1] * c, gt[2] * c, gt[3], gt[4] * c, gt[5] * c)

    def block(self, x0: int, y0: int, w: int, h: int) -> Tuple[int, int, int, int]:
        """Cells whose centre lies in pixels [x0, x0+w) x [y0, y0+h): ``(r0, r1, c0, c1)``, half-open."""
        r0 = int(np.searchsorted(self.cy, y0, "left"))
        r1 = int(np.searchsorted(self.cy, y0 + h, "left"))
        c0 = int(np.searchsorted(self.cx, x0, "left"))
        c1 = int(np.searchsorted(self.cx, x0 + w, "left"))
        return r0, r1, c0, c1


# -- features from the streamed windows ------------------------------------------------------------------
class FeatureRunner(NetworkRunner):
    """The network's stride-4 feature maps of a batch of windows.

    Call: float32 (B, 3, window, window), normalised → ``{"fused": (B, 256, window/4, window/4),
    "z": (B, C', window/4, window/4)}`` float32 on the device, where ``z`` is the clustering space:
    ``"fused"`` (G, C' = 256), ``"embedding"`` (P, C' = D; text fusion only) or ``"both"`` (each
    L2-normalised, concatenated and divided by √2). Channels_last, and the job's precision
    (:mod:`core.execution`; an ``auto`` check compares the model's classes from the fused map).

    Raises:
        InputError: ``features`` unknown, or ``"embedding"``/``"both"`` on a model without text fusion.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, features: str = "fused", precision="fp32",
                 log=None):
        if features not in FEATURE_SPACES:
            raise InputError(f"--features must be one of {', '.join(FEATURE_SPACES)} (got {features!r})")
        if features != "fused" and getattr(model.head, "text_bank", None) is None:
            raise InputError(f"--features {features}: the model has no text fusion (no text-aligned projection); "
                             "use --features fused")
        super().__init__(model, device, precision, log)
        self.features = features

    def _classes(self, out: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's classes at stride 4 from the fused map (the precision check's measure)."""
        return self.model.head.classifier(out["fused"].float()).argmax(1)  # float32 (outside the head's scope)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch = self._input(batch)
        out = self.run(lambda: self.model.forward_features(batch), self._classes)
        fused = out["fused"].float()
        if self.features == "fused":
            z = fused
        elif self.features == "embedding":
            z = out["embedding"].float()
        else:
            z = torch.cat([F.normalize(fused, dim=1, eps=1e-6), F.normalize(out["embedding"].float(), dim=1)],
                          dim=1) / math.sqrt(2.0)
        return {"fused": fused, "z": z}


def _sample(feat: torch.Tensor, w, cy: np.ndarray, cx: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """grid_sample coordinates (align_corners=False) in a window's feature map (C, hf, wf) of pixel
    centres ``cx`` (columns) and ``cy`` (rows) of the raster; feature i's centre is window pixel 4i + 1.5."""
    hf, wf = feat.shape[-2:]
    u = (np.asarray(cx, dtype=np.float64) - w.x - 1.5) / CELL
    v = (np.asarray(cy, dtype=np.float64) - w.y - 1.5) / CELL
    gx = torch.as_tensor((2.0 * u + 1.0) / wf - 1.0, dtype=torch.float32, device=feat.device)
    gy = torch.as_tensor((2.0 * v + 1.0) / hf - 1.0, dtype=torch.float32, device=feat.device)
    return gx, gy


def _grid_block(feat: torch.Tensor, w, cy: np.ndarray, cx: np.ndarray) -> torch.Tensor:
    """(C, hf, wf) sampled at the block of cell centres cy (n,) × cx (m,) → (C, n, m)."""
    gx, gy = _sample(feat, w, cy, cx)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # (1, n, m, 2) as (x, y)
    return F.grid_sample(feat[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _grid_points(feat: torch.Tensor, w, cy: np.ndarray, cx: np.ndarray) -> torch.Tensor:
    """(C, hf, wf) sampled at points (cy[i], cx[i]) → (n, C)."""
    gx, gy = _sample(feat, w, cy, cx)
    grid = torch.stack([gx, gy], dim=-1)[None, None]  # (1, 1, n, 2)
    return F.grid_sample(feat[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def _valid_cells(valid: Optional[np.ndarray], y0: int, cy: np.ndarray, cx: np.ndarray) -> Optional[np.ndarray]:
    """A cell is valid when its centre pixel is: bool (n, m) for the block cy × cx, or None (no nodata)."""
    if valid is None:
        return None
    rows = np.clip(np.floor(cy).astype(np.int64) - y0, 0, valid.shape[0] - 1)
    cols = np.clip(np.floor(cx).astype(np.int64), 0, valid.shape[1] - 1)
    return valid[np.ix_(rows, cols)]


class _SupportSums:
    """The running sums of :func:`sample_cell_features`: per support cell the z and fused features and the
    windows that saw it, and the background sum of z over every valid cell of the windows run."""

    def __init__(self, grid: CellGrid, cells: np.ndarray, extra_windows: Sequence[Tuple[int, int]]):
        self.grid = grid
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        self.M = len(cells)
        self.pcy, self.pcx = grid.cy[cells[:, 0]], grid.cx[cells[:, 1]]
        self.extra = {(int(x), int(y)) for x, y in extra_windows}
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = np.zeros(self.M, dtype=np.int64)
        self.bg_sum, self.bg_n, self.n_windows = None, 0, 0

    def inside(self, w) -> np.ndarray:
        """bool (M,): the cells whose centre lies in window ``w``."""
        pcy, pcx = self.pcy, self.pcx
        return (pcy >= w.y) & (pcy < w.y + w.h) & (pcx >= w.x) & (pcx < w.x + w.w)

    def want(self, w) -> bool:
        """A window to run: an extra (background) window, or one holding a support cell's centre."""
        return (w.x, w.y) in self.extra or (self.M > 0 and bool(self.inside(w).any()))

    def add(self, w, y0: int, valid: Optional[np.ndarray], feats: Dict[str, torch.Tensor]) -> None:
        """Add window ``w``'s feature maps ``{"z": (C', hf, wf), "fused": (256, hf, wf)}`` (its strip
        starts at row ``y0``; ``valid`` bool (rows, W) or None)."""
        grid = self.grid
        self.n_windows += 1
        r0, r1, c0, c1 = grid.block(w.x, w.y, w.w, w.h)
        zb = _grid_block(feats["z"], w, grid.cy[r0:r1], grid.cx[c0:c1])
        vb = _valid_cells(valid, y0, grid.cy[r0:r1], grid.cx[c0:c1])
        flat = zb.flatten(1)
        if vb is not None:
            flat = flat[:, torch.from_numpy(vb.ravel()).to(flat.device)]
        s = flat.sum(1).cpu()
        self.bg_sum = s if self.bg_sum is None else self.bg_sum + s
        self.bg_n += flat.shape[1]
        sel = np.nonzero(self.inside(w))[0] if self.M else np.zeros(0, np.int64)
        if len(sel):
            if valid is not None:
                ok = valid[np.floor(self.pcy[sel]).astype(np.int64) - y0, np.floor(self.pcx[sel]).astype(np.int64)]
                sel = sel[ok]
            if not len(sel):
                return
            for key in ("z", "fused"):
                v = _grid_points(feats[key], w, self.pcy[sel], self.pcx[sel]).cpu()
                if key not in self.sums:
                    self.sums[key] = torch.zeros((self.M, v.shape[1]), dtype=torch.float32)
                self.sums[key][torch.from_numpy(sel)] += v  # sel holds distinct cells
            self.count[sel] += 1

    def result(self) -> dict:
        """The means: see :func:`sample_cell_features`."""
        out = {"count": self.count, "windows": self.n_windows}
        for key in ("z", "fused"):
            s = self.sums.get(key)
            if s is None:
                out[key] = torch.zeros((self.M, 0))
            else:
                out[key] = s / torch.from_numpy(np.maximum(self.count, 1)).float()[:, None]
        out["background_z"] = None if self.bg_sum is None else self.bg_sum / max(1, self.bg_n)
        return out


def _run_windows(read_strip, plan, runner: FeatureRunner, mean, std, batch_size: int,
                 on_window: Callable[[StripRow, object, Dict[str, torch.Tensor]], None],
                 on_row: Optional[Callable[[StripRow], None]] = None, want: Optional[Callable] = None,
                 prefetch: bool = True, progress=None) -> None:
    """Run ``runner`` on the windows of :func:`core.windows.iter_window_rows`, row by row.

    Calls ``on_window(row, window, {"z": (C', hf, wf), "fused": (256, hf, wf)})`` per window run (one
    batch's features on the device at a time), then ``progress(share of the plan's windows passed)`` and
    ``on_row(row)`` after each row of windows (rows with no window run included).
    """
    total = max(1, plan.n_windows)
    done = 0
    with contextlib.closing(iter_window_rows(read_strip, plan, mean, std, batch_size, want, prefetch)) as rows:
        for row in rows:
            for batch in row.batches():
                feats = runner(batch.tensor)
                for i, w in enumerate(batch.windows):
                    on_window(row, w, {k: v[i] for k, v in feats.items()})
            done += len(row.windows)
            if progress:
                progress(done / total)
            if on_row is not None:
                on_row(row)


def sample_cell_features(read_strip, plan, grid: CellGrid, runner: FeatureRunner, mean, std, batch_size: int,
                         cells: np.ndarray, extra_windows: Sequence[Tuple[int, int]] = (), prefetch: bool = True,
                         progress=None) -> dict:
    """Features of the given cells, averaged over the windows whose area holds each cell's centre.

    Only the windows holding a cell's centre, and ``extra_windows``, are run (rows with none are not read).

    Args:
        read_strip: ``(y0, rows) -> (data (n, rows, W), valid (rows, W) or None)`` (a
            :class:`core.geo.raster.StripReader`'s ``read``, or an in-memory slice).
        plan: :class:`core.windows.SlidePlan`; grid: the raster's :class:`CellGrid`.
        runner: the network's :class:`FeatureRunner`. mean, std: the model's normalisation.
        batch_size: windows per forward pass. cells: int (M, 2) cell (row, col) indices.
        extra_windows: ``(x, y)`` offsets of further windows of ``plan`` to run for the background mean.
        prefetch: read the next strip in a background thread. progress: called with the share done.

    Returns:
        ``{"z": float32 (M, C') mean features (not normalised), "fused": float32 (M, 256),
        "count": int (M,) windows that saw each cell (0: none, e.g. nodata), "background_z": float32
        (C',) mean of z over every valid cell of the windows run, "windows": n}``.
    """
    sums = _SupportSums(grid, cells, extra_windows)

    def on_window(row: StripRow, w, feats: Dict[str, torch.Tensor]) -> None:
        sums.add(w, row.y, row.valid, feats)

    _run_windows(read_strip, plan, runner, mean, std, batch_size, on_window, want=sums.want, prefetch=prefetch,
                 progress=progress)
    return sums.result()


class _CellRows:
    """The bounded accumulator of :func:`stream_cell_maps`: sums and counts of ``channels`` per-cell maps
    for the cell rows in flight, float64 (channels, rows, cols) and (rows, cols), from cell row ``first``."""

    def __init__(self, grid: CellGrid, channels: int, rows: int):
        self.grid, self.nb, self.first = grid, rows, 0
        self.acc = np.zeros((channels, rows, grid.cols), dtype=np.float64)
        self.cnt = np.zeros((rows, grid.cols), dtype=np.float64)

    def add(self, w, r0: int, r1: int, c0: int, c1: int, vals: np.ndarray, vb: Optional[np.ndarray]) -> None:
        """Add window ``w``'s maps (channels, r1-r0, c1-c0) of cells [r0, r1) x [c0, c1); ``vb`` bool
        (r1-r0, c1-c0) valid cells, or None (all valid)."""
        a, b = r0 - self.first, r1 - self.first
        if a < 0 or b > self.nb:  # cannot happen with plan's windows; guard against misuse
            raise RuntimeError(f"window at y={w.y} covers cell rows {r0}..{r1} outside the buffer")
        if vb is None:
            self.acc[:, a:b, c0:c1] += vals
            self.cnt[a:b, c0:c1] += 1.0
        else:
            self.acc[:, a:b, c0:c1] += np.where(vb[None], vals, 0.0)
            self.cnt[a:b, c0:c1] += vb

    def finish(self, r_done: int, on_rows: Callable[[int, np.ndarray], None]) -> None:
        """Hand the averaged cell rows before ``r_done`` to ``on_rows(r0, maps)`` (NaN where never seen)
        and move the rest of the buffer up."""
        acc, cnt, nb = self.acc, self.cnt, self.nb
        n = r_done - self.first
        if n <= 0:
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            maps = (acc[:, :n] / cnt[:n]).astype(np.float32)
        maps[:, cnt[:n] == 0] = np.nan
        on_rows(self.first, maps)
        acc[:, :nb - n] = acc[:, n:].copy()
        cnt[:nb - n] = cnt[n:].copy()
        acc[:, nb - n:] = 0.0
        cnt[nb - n:] = 0.0
        self.first = r_done


def stream_cell_maps(read_strip, plan, grid: CellGrid, runner: FeatureRunner, mean, std, batch_size: int,
                     cell_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor], channels: int,
                     on_rows: Callable[[int, np.ndarray], None], prefetch: bool = True, progress=None) -> dict:
    """Per-cell maps of every window, averaged over overlapping windows, handed over row by row.

    For each window, its features are resampled at the centres of the cells its area holds and mapped
    by ``cell_fn({"z": (C', n, m), "fused": (256, n, m)}) -> (channels, n, m)``; values of cells seen by
    several windows are averaged (as segmentation averages logits). Rows of cells that no later window
    covers go to ``on_rows(r0, maps float32 (channels, rows, cols))``, NaN where no window saw a valid
    centre pixel. Memory: ``channels`` × (window/4 + 3) × cols floats.

    Returns:
        ``{"windows": n run, "seconds": forward-and-map time}``.
    """
    buf = _CellRows(grid, channels, plan.win_h // CELL + 3)
    n_windows = 0
    t0 = time.perf_counter()

    def on_window(row: StripRow, w, feats: Dict[str, torch.Tensor]) -> None:
        nonlocal n_windows
        n_windows += 1
        r0, r1, c0, c1 = grid.block(w.x, w.y, w.w, w.h)
        if r1 <= r0 or c1 <= c0:
            return
        block = {k: _grid_block(v, w, grid.cy[r0:r1], grid.cx[c0:c1]) for k, v in feats.items()}
        vals = cell_fn(block).float().cpu().numpy()
        buf.add(w, r0, r1, c0, c1, vals, _valid_cells(row.valid, row.y, grid.cy[r0:r1], grid.cx[c0:c1]))

    def on_row(row: StripRow) -> None:
        last = row.next_y >= plan.height
        buf.finish(grid.rows if last else int(np.searchsorted(grid.cy, row.next_y, "left")), on_rows)

    _run_windows(read_strip, plan, runner, mean, std, batch_size, on_window, on_row, prefetch=prefetch,
                 progress=progress)
    return {"windows": n_windows, "seconds": time.perf_counter() - t0}


def image_cell_features(image: np.ndarray, model: torch.nn.Module, mean, std, *,
                        window: int = DEFAULT_INFERENCE["window"], stride: int = DEFAULT_INFERENCE["stride"], batch_size: int = 2, device: str = "cpu", features: str = "fused",
                        valid: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
    """Every cell's features of an in-memory image (for the benchmark and tests; memory grows with it).

    Args:
        image: (3, H, W) in the model's value range (uint8 or float32), not normalised.

    Returns:
        ``{"z": float32 (C', rows, cols), "fused": float32 (256, rows, cols)}`` averaged over windows
        (not normalised; NaN where no window saw a valid centre pixel).
    """
    from core.windows import SlidePlan, validate_window
    from core.device import resolve_device

    validate_window(window, stride)
    H, W = image.shape[-2:]
    plan = SlidePlan(H, W, window, stride)
    grid = CellGrid(H, W)
    runner = FeatureRunner(model, resolve_device(device), features)

    def read_strip(y0, rows):
        return image[:, y0:y0 + rows], None if valid is None else valid[y0:y0 + rows]

    def cell_fn(block):
        return torch.cat([block["z"], block["fused"]], 0)

    cz = {"fused": model.head.channels, "embedding": None, "both": None}[features]
    if cz is None:
        d = model.head.text_bank.shape[1]
        cz = d if features == "embedding" else model.head.channels + d
    C = cz + model.head.channels
    out = np.full((C, grid.rows, grid.cols), np.nan, dtype=np.float32)

    def on_rows(r0, maps):
        out[:, r0:r0 + maps.shape[1]] = maps

    stream_cell_maps(read_strip, plan, grid, runner, mean, std, batch_size, cell_fn, C, on_rows, prefetch=False)
    t = torch.from_numpy(out)
    return {"z": t[:cz], "fused": t[cz:]}
