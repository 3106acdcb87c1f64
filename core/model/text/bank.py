"""The SRMF text bank: general representation knowledge injection, text side.

SRMF (Yang et al., IEEE TGRS 2025, arXiv 2504.19839), "general representation knowledge injection"
(text–visual fusion): a fixed bank T of N prompts "A satellite image of {concept}", one per general
land-cover concept, encoded once by a frozen text encoder and L2-normalised row by row (N×D). The
decode head (``core.model.network``) projects every pixel into the text space and compares it with T.
Nothing on the text side is trained, and the bank does not depend on the dataset's classes (the
paper uses 54 concepts and CLIP ViT-H/14, D = 1024); custom classes add their own prompts.

This module has three parts:

* the concept vocabulary (``resources/concepts.json``): :func:`load_vocabulary`, :func:`prompts_for`,
  :func:`concept_for_class`;
* text encoders behind one small interface (``encoder_id``, ``dim``, ``encode``):
  :class:`MiniLMTextEncoder` (offline, bundled weights, D = 384, the default) and
  :class:`OpenCLIPTextEncoder` (open_clip, e.g. ViT-H-14 ``laion2b_s32b_b79k``, D = 1024, the
  paper's), chosen by a spec string with :func:`get_text_encoder`;
* :func:`build_text_bank`, which encodes prompts into the bank, with an on-disk cache keyed by
  (encoder id, prompt) in safetensors files (never a pickle).

Encoders load their weights lazily, on the first :meth:`encode`: a bank whose prompts are all in
the cache is built without loading (or downloading) any model.

No qgis or Qt imports here: this runs in the worker interpreter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence
import torch
import torch.nn.functional as F
from core.model.text.encoders import TextEncoder, as_plain_float32
from core.errors import InputError, WriteError
from core.files import atomic_output

log = logging.getLogger(__name__)

NORM_EPS = 1e-6
"""eps of the row L2 normalisation (the reference code has none: a zero row would give NaN)."""

CACHE_ENV = "SRMF_CACHE_DIR"
CACHE_FORMAT = "srmf-text-bank"
CACHE_FORMAT_VERSION = "1"


# --------------------------------------------------------------------------------------------------
# The text bank and its cache
# --------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$SRMF_CACHE_DIR/text_bank`` if the variable is set, else ``~/.cache/srmf/text_bank``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "srmf") / "text_bank"


def prompt_key(prompt: str) -> str:
    """Cache key of a prompt: the sha256 hex digest of its UTF-8 bytes (exact text, case included)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def cache_file(encoder_id: str, cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """The cache file of one encoder: ``<cache_dir>/<readable id>-<sha256(id)[:16]>.safetensors``."""
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id).strip("._")[:80] or "encoder"
    return d / f"{readable}-{hashlib.sha256(encoder_id.encode('utf-8')).hexdigest()[:16]}.safetensors"


def _read_cache(path: Path, encoder_id: str, dim: int) -> Dict[str, torch.Tensor]:
    """Rows cached for this encoder (key → float32 (D,)); {} if absent or unusable (with a warning)."""
    if not path.is_file():
        return {}
    from safetensors.torch import load as st_load
    try:
        data = path.read_bytes()  # read whole: no mmap left open (os.replace on Windows)
        meta = _safetensors_metadata(data)
        tensors = st_load(data)
    except Exception as e:
        log.warning("text bank cache %s is unreadable (%s); it will be rebuilt", path, e)
        return {}
    if meta.get("format") != CACHE_FORMAT or meta.get("encoder_id") != encoder_id or meta.get("dim") != str(dim):
        log.warning("text bank cache %s belongs to another encoder or format (%s); it will be rebuilt",
                    path, {k: meta.get(k) for k in ("format", "encoder_id", "dim")})
        return {}
    rows = {}
    for k, t in tensors.items():
        if t.dtype == torch.float32 and t.shape == (dim,) and bool(torch.isfinite(t).all()):
            rows[k] = t
    return rows


def _safetensors_metadata(data: bytes) -> Dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    return header.get("__metadata__") or {}


def _write_cache(path: Path, encoder_id: str, dim: int, rows: Dict[str, torch.Tensor],
                 prompts: Dict[str, str]) -> None:
    """Merge rows into the cache file atomically (temp file in the same folder + os.replace)."""
    from safetensors.torch import save as st_save

    merged = _read_cache(path, encoder_id, dim)  # keep rows another process may have added
    merged.update(rows)
    meta = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
            "encoder_id": encoder_id, "dim": str(dim)}
    old_prompts: Dict[str, str] = {}
    try:
        if path.is_file():
            old_prompts = json.loads(_safetensors_metadata(path.read_bytes()).get("prompts", "{}"))
    except Exception:
        old_prompts = {}
    old_prompts.update(prompts)
    meta["prompts"] = json.dumps({k: old_prompts[k] for k in sorted(merged) if k in old_prompts},
                                 ensure_ascii=False)
    blob = st_save({k: v.contiguous().clone() for k, v in sorted(merged.items())}, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def build_text_bank(prompts: Sequence[str], encoder: TextEncoder,
                    cache_dir: Optional[os.PathLike | str] = None) -> torch.Tensor:
    """The SRMF text bank T: prompts encoded by a frozen text encoder, rows L2-normalised.

    SRMF, arXiv 2504.19839, general representation knowledge injection: T (N×D) is computed once
    and fixed; the head compares per-pixel projections with it by cosine similarity.

    Rows are cached per (encoder id, prompt) in one safetensors file per encoder in ``cache_dir``
    (default :func:`default_cache_dir`), keyed by :func:`prompt_key`; only prompts missing from the
    cache are encoded (one ``encoder.encode`` call, unique prompts in first-seen order), and the file
    is rewritten atomically. The stored rows are the normalised ones, so a bank rebuilt from the
    cache is bit-identical to the first. An unreadable cache is ignored with a warning; an unwritable
    cache folder only loses the caching (warning).

    Args:
        prompts: N prompts (e.g. ``prompts_for(load_vocabulary())``); duplicates give equal rows.
        encoder: an object with ``encoder_id`` (str), ``dim`` (int) and ``encode(list[str])`` →
            (M, D) tensor, e.g. from :func:`get_text_encoder`.
        cache_dir: folder of the cache files.

    Returns:
        float32 (N, D) on the CPU, each row of unit L2 norm (``F.normalize``, eps 1e-6).

    Raises:
        ValueError: ``prompts`` is empty or holds a non-string/empty prompt; the encoder lacks the
            interface. RuntimeError: the encoder returns a wrong shape, non-finite values or a zero
            vector.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: the text bank needs at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt #{i} is not a non-empty string: {p!r}")
    encoder_id = getattr(encoder, "encoder_id", None)
    dim = getattr(encoder, "dim", None)
    if not isinstance(encoder_id, str) or not encoder_id or not isinstance(dim, int) or dim <= 0 \
            or not callable(getattr(encoder, "encode", None)):
        raise ValueError(f"{encoder!r} is not a text encoder (needs encoder_id: str, dim: int, encode())")

    path = cache_file(encoder_id, cache_dir)
    keys = [prompt_key(p) for p in prompts]
    rows = _read_cache(path, encoder_id, dim)

    missing: Dict[str, str] = {}
    for k, p in zip(keys, prompts):
        if k not in rows and k not in missing:
            missing[k] = p
    if missing:
        todo = list(missing.values())
        emb = as_plain_float32(encoder.encode(todo), len(todo), dim, encoder_id)
        if not bool(torch.isfinite(emb).all()):
            raise RuntimeError(f"text encoder {encoder_id} returned non-finite values")
        norms = emb.norm(dim=1)
        if bool((norms < NORM_EPS).any()):
            bad = [todo[i] for i in torch.nonzero(norms < NORM_EPS).flatten().tolist()]
            raise RuntimeError(f"text encoder {encoder_id} returned a zero vector for {bad[:3]}")
        emb = F.normalize(emb, dim=1, eps=NORM_EPS)
        new_rows = {k: emb[i].clone() for i, k in enumerate(missing)}
        rows.update(new_rows)
        try:
            _write_cache(path, encoder_id, dim, new_rows, missing)
        except (OSError, InputError, WriteError) as e:  # atomic_output names I/O failures so
            log.warning("cannot write the text bank cache %s (%s); continuing without caching", path, e)
    return torch.stack([rows[k] for k in keys]).contiguous()
