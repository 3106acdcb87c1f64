"""The SRMF model file (``.srmf``): one self-describing safetensors file.

Layout (the safetensors format: 8-byte little-endian header length, a JSON header, raw tensor data)::

    header["__metadata__"]["srmf"] = JSON text of the SRMF header (below)
    tensors: the network's state dict, including ``head.text_bank`` float32 (N, D) when text fusion is on

The SRMF header::

    format: "srmf-model", format_version: 1
    architecture: {name, backbone, head_channels, dropout, text_fusion}
    classes: [{id, name, colour "#RRGGBB", prompt}]        ids 0..254 (255 is nodata/ignore)
    text_encoder: {id, dim} | null
    text_bank: {prompts: [N strings], concepts: [N strings]} | null
    input: {bands: ["red", "green", "blue"], value_range: [0, 255], mean: [3], std: [3],
            scaling: {rule, low_percentile, high_percentile, sample_size}}
    gsd_m: float | null            ground sample distance of the training imagery, metres
    inference: {window, stride}    pixels
    provenance: {created, untrained, note, ...}
    metrics: {...}

Loading reads only this format: it never unpickles (a pickle or ``torch.save`` checkpoint is refused
with a clear error). :func:`read_header` needs neither torch nor numpy, so light tools can use it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from core.errors import ModelFileError
from core.files import REPO_ROOT
from core.files import atomic_output

FORMAT = "srmf-model"
FORMAT_VERSION = 1
METADATA_KEY = "srmf"
_MAX_HEADER = 100 * 1024 * 1024

# What the engine assumes when a header leaves it out.
DEFAULT_INPUT = {
    "bands": ["red", "green", "blue"],
    "value_range": [0, 255],
    # ImageNet statistics in 0..255 units (the backbones' pretraining).
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
    "scaling": {
        "rule": "uint8 rasters are used as they are; other data types are mapped linearly from the "
                "per-band low..high percentiles (computed once, nodata excluded, on a decimated read "
                "that uses the raster's overviews) onto value_range, values beyond are saturated and "
                "the saturated share is reported",
        "low_percentile": 2.0,
        "high_percentile": 98.0,
        "sample_size": 1024,
    },
}
DEFAULT_INFERENCE = {"window": 512, "stride": 341}


def _sniff(path: Path) -> Tuple[int, dict]:
    """Check the file's framing; return (header length, safetensors JSON header)."""
    if not path.exists():
        raise ModelFileError(f"Model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"Model path is not a file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        framed = 2 <= n <= _MAX_HEADER and 8 + n <= size
        raw = fh.read(n) if framed else b""
    # The safetensors framing is checked first: a valid header length may itself start with a byte
    # that looks like a pickle opcode (e.g. 0x80), so sniffing magic bytes first would refuse good files.
    if not (framed and raw[:1] == b"{"):
        if head[:1] == b"\x80" or head[:2] in (b"(d", b"}q", b"cc"):
            raise ModelFileError(f"{path} is a Python pickle, not an SRMF model; SRMF never unpickles "
                                 "model files (they may execute code). Convert the weights to safetensors.")
        if head[:4] == b"PK\x03\x04":
            raise ModelFileError(f"{path} is a PyTorch torch.save checkpoint (zip of pickles), not an SRMF "
                                 "model; SRMF never unpickles model files. Convert the weights to safetensors.")
        if len(head) < 8:
            raise ModelFileError(f"{path} is not an SRMF model file: only {size} bytes (truncated or empty)")
        if not framed:
            raise ModelFileError(f"{path} is not an SRMF model file (no safetensors header), or it is "
                                 f"truncated: header length {n} for a file of {size} bytes")
    if not raw.lstrip()[:1] == b"{":
        raise ModelFileError(f"{path} is not an SRMF model file (no JSON header)")
    try:
        st_header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: the model header is corrupt ({exc})") from exc
    if not isinstance(st_header, dict):
        raise ModelFileError(f"{path}: the model header is corrupt (not a JSON object)")
    end = 0
    for name, entry in st_header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise ModelFileError(f"{path}: the model header is corrupt (tensor {name!r})") from exc
    if 8 + n + end != size:
        raise ModelFileError(f"{path} is truncated or corrupt: the header describes {8 + n + end} bytes, "
                             f"the file has {size}")
    return n, st_header


def read_header(path) -> Dict[str, Any]:
    """The SRMF header of a model file, as a dict (see the module docstring), without loading weights.

    Raises:
        ModelFileError: missing, truncated, corrupt, pickle, or foreign (safetensors without an SRMF
            header) file; a header that lacks required entries.
    """
    path = Path(path)
    _, st_header = _sniff(path)
    meta = st_header.get("__metadata__") or {}
    if METADATA_KEY not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not an SRMF model (no '{METADATA_KEY}' header)")
    try:
        header = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the SRMF header is corrupt ({exc})") from exc
    validate_header(header, path)
    header.setdefault("input", {})
    for k, v in DEFAULT_INPUT.items():
        header["input"].setdefault(k, v)
    header["inference"] = {**DEFAULT_INFERENCE, **(header.get("inference") or {})}
    validate_input_and_inference(header, path)
    return header


def _numbers(value, n: Optional[int] = None) -> bool:
    ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and math.isfinite(v) for v in value)
    return ok and (n is None or len(value) == n)


def validate_input_and_inference(header: dict, path="model") -> None:
    """The header's ``input`` and ``inference`` blocks (defaults filled in), checked once on load (issue 13):
    a file that passes cannot fail later on a broadcast, a division by zero or a window rule.

    Raises:
        ModelFileError: naming the file and the field — ``input.bands`` not a non-empty list of names;
            ``input.mean``/``input.std`` not one finite number per band, or a std that is not positive;
            ``input.value_range`` not two finite numbers, low < high; ``inference.window`` not a multiple
            of 32 of at least 32; ``inference.stride`` not 1..window.
    """
    inp, inf = header["input"], header["inference"]
    bands = inp.get("bands")
    if not isinstance(bands, list) or not bands or not all(isinstance(b, str) for b in bands):
        raise ModelFileError(f"{path}: input.bands must be a list of band names, got {bands!r}")
    n = len(bands)
    for key in ("mean", "std"):
        if not _numbers(inp.get(key), n):
            raise ModelFileError(f"{path}: input.{key} must be {n} finite numbers (one per band of input.bands "
                                 f"{bands}), got {inp.get(key)!r}")
    if not all(v > 0 for v in inp["std"]):
        raise ModelFileError(f"{path}: input.std must be positive for every band, got {inp['std']!r}")
    vr = inp.get("value_range")
    if not _numbers(vr, 2) or not vr[0] < vr[1]:
        raise ModelFileError(f"{path}: input.value_range must be [low, high] with low < high, got {vr!r}")
    window, stride = inf.get("window"), inf.get("stride")
    if not isinstance(window, int) or isinstance(window, bool) or window < 32 or window % 32:
        raise ModelFileError(f"{path}: inference.window must be a multiple of 32 pixels, at least 32, got {window!r}")
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= window:
        raise ModelFileError(f"{path}: inference.stride must be between 1 and inference.window ({window}), "
                             f"got {stride!r}")


def validate_header(header: dict, path="model") -> None:
    """Raise ModelFileError naming what is missing or wrong in an SRMF header."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an SRMF model (format is not {FORMAT!r})")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer SRMF (format version {header.get('format_version')}); "
                             "update the plugin")
    arch = header.get("architecture")
    if not isinstance(arch, dict) or "backbone" not in arch:
        raise ModelFileError(f"{path}: the SRMF header has no architecture/backbone")
    classes = header.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ModelFileError(f"{path}: the SRMF header has no class table")
    ids = []
    for c in classes:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ModelFileError(f"{path}: a class table entry lacks id or name: {c!r}")
        ids.append(int(c["id"]))
    if sorted(ids) != list(range(len(ids))):
        raise ModelFileError(f"{path}: class ids must be 0..{len(ids) - 1}, got {sorted(ids)}")
    if len(ids) > 255:
        raise ModelFileError(f"{path}: at most 255 classes are supported (255 is nodata)")


def save_model(path, model, header: dict) -> Path:
    """Write ``model`` and ``header`` to ``path`` atomically (temporary file, then rename).

    ``header`` needs at least architecture and classes; format, input, inference and a creation time
    are filled in. The state dict (float tensors kept as they are) goes to safetensors.

    Returns:
        The path written.
    Raises:
        ModelFileError: the header is invalid; OSError: the folder is not writable.
    """
    from safetensors.torch import save_file

    path = Path(path)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **header}
    full.setdefault("input", DEFAULT_INPUT)
    full.setdefault("inference", DEFAULT_INFERENCE)
    full.setdefault("provenance", {})
    full["provenance"].setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    full.setdefault("metrics", {})
    validate_header(full, path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # publishing sets the mode: safetensors re-creates the file 0600
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(full)})
    return path


class LoadedModel:
    """A model file loaded for inference: ``model`` (SRMFNet, eval mode) and its ``header``."""

    def __init__(self, model, header: dict, path: Path):
        self.model = model
        self.header = header
        self.path = path

    @property
    def classes(self):
        return sorted(self.header["classes"], key=lambda c: int(c["id"]))

    @property
    def num_classes(self) -> int:
        return len(self.header["classes"])

    @property
    def untrained(self) -> bool:
        return bool((self.header.get("provenance") or {}).get("untrained", False))

    @property
    def head_untrained(self) -> bool:
        """True for a pretrained encoder whose decode head was never trained (``python -m core pretrain``)."""
        return bool((self.header.get("provenance") or {}).get("untrained_head", False))


def load_model(path, device: str = "cpu") -> LoadedModel:
    """Load a ``.srmf`` file: header checks, then the network built from the header, then the weights.

    Returns:
        :class:`LoadedModel` with the network in eval mode on ``device``.
    Raises:
        ModelFileError: any problem with the file (never unpickles), including weights that do not fit
            the architecture the header describes.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from core.model.network import build_from_config

    path = Path(path)
    header = read_header(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read the weights ({exc})") from exc
    bank = state.get("head.text_bank")
    arch = header["architecture"]
    if arch.get("text_fusion", True) and bank is None:
        raise ModelFileError(f"{path}: the architecture uses text fusion but the file has no head.text_bank")
    prompts = (header.get("text_bank") or {}).get("prompts")
    if bank is not None and prompts is not None and len(prompts) != bank.shape[0]:
        raise ModelFileError(f"{path}: the text bank has {bank.shape[0]} rows but the header lists "
                             f"{len(prompts)} prompts")
    try:
        model = build_from_config(arch, len(header["classes"]), bank, in_bands=len(header["input"]["bands"]))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path}: cannot build the network the header describes ({exc})") from exc
    stem = next((n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)), None)
    weight = state.get(f"{stem}.weight") if stem else None
    if weight is not None and weight.ndim == 4 and weight.shape[1] != len(header["input"]["bands"]):
        raise ModelFileError(f"{path}: input.bands lists {len(header['input']['bands'])} bands but the network's "
                             f"first convolution reads {weight.shape[1]} channels")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: the weights do not fit the {arch.get('backbone')} architecture "
                             f"({str(exc).splitlines()[0]})") from exc
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is not None and first.in_channels != len(header["input"]["bands"]):
        raise ModelFileError(f"{path}: input.bands lists {len(header['input']['bands'])} bands but the network's "
                             f"first convolution reads {first.in_channels} channels")
    model.eval().to(device)
    return LoadedModel(model, header, path)


def describe(header: dict, path=None) -> str:
    """A human-readable summary of a model header (for ``python -m core info``)."""
    arch = header["architecture"]
    lines = []
    if path is not None:
        lines.append(f"Model: {path}")
    prov = header.get("provenance") or {}
    if prov.get("untrained"):
        lines.append("WARNING: UNTRAINED PLACEHOLDER — predictions are not meaningful")
    if prov.get("untrained_head"):
        lines.append("PRETRAINED ENCODER, UNTRAINED HEAD — fine-tune it (finetune --base-model) before segmenting")
    for key, what in (("pretraining", "Pretraining"), ("encoder_pretraining", "Encoder pretraining")):
        pre = header.get(key)
        if isinstance(pre, dict):
            lines.append(f"{what}: {pre.get('method')}, {pre.get('iterations')} steps "
                         f"({pre.get('gs_iterations', 0)} gradient-guided) in {pre.get('seconds')} s on "
                         f"{len(pre.get('rasters') or [])} raster(s), from {pre.get('started_from')}")
    lines.append(f"Architecture: {arch.get('name', 'srmf')} (backbone {arch['backbone']}, "
                 f"text fusion {'on' if arch.get('text_fusion', True) else 'off'})")
    te = header.get("text_encoder") or {}
    bank = header.get("text_bank") or {}
    if te:
        lines.append(f"Text encoder: {te.get('id')} (D={te.get('dim')}), bank of {len(bank.get('prompts') or [])} prompts")
    inp = header["input"]
    lines.append(f"Input: bands {', '.join(inp['bands'])}; values {inp['value_range'][0]}..{inp['value_range'][1]}; "
                 f"mean {inp['mean']}; std {inp['std']}")
    gsd = header.get("gsd_m")
    lines.append(f"Ground sample distance: {gsd} m" if gsd else "Ground sample distance: unknown")
    inf = header["inference"]
    lines.append(f"Window {inf['window']} px, stride {inf['stride']} px")
    lines.append("Classes:")
    for c in sorted(header["classes"], key=lambda c: int(c["id"])):
        lines.append(f"  {int(c['id']):3d}  {c['name']:<20s} {c.get('colour', ''):8s} {c.get('prompt', '')}")
    if header.get("metrics"):
        lines.append("Metrics: " + json.dumps(header["metrics"]))
    if prov:
        lines.append("Provenance: " + json.dumps(prov))
    return "\n".join(lines)


DEFAULT_MODEL_PATH = REPO_ROOT / "resources" / "models" / "default.srmf"
