"""The SRMF network and everything about a model: backbones, pretrained weights, the .srmf model file,
the embedded default model, adapting a head to a new class table; text/ holds the text bank."""
