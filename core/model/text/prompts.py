"""Concept prompts of the text bank: the concept vocabulary (``resources/concepts.json``), the concept of a
class name and the prompt template "A satellite image of {concept}" (DESIGN.md, method 3). No torch."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from core.errors import InputError
from core.files import REPO_ROOT

PROMPT_TEMPLATE = "A satellite image of {concept}"
"""The paper's prompt template; ``{concept}`` is replaced by a lower-case concept phrase."""

DEFAULT_VOCABULARY = REPO_ROOT / "resources" / "concepts.json"


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
