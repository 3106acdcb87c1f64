"""EfficientNet-Lite0 ImageNet weights in the smp/timm encoder reproduce the reference implementation.

The reference is ``efficientnet-lite-pytorch`` (lukemelas-style EfficientNet with TF "SAME" padding),
the model the weights file was saved from. Everything runs offline on the CPU, float32, eval mode.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch")
timm = pytest.importorskip("timm")

from core.model.pretrained import (EFFICIENTNET_LITE, EFFICIENTNET_LITE0_ENCODER, LITE0_STAGE_REPEATS,
                                   efficientnet_lite0_weights_path, efficientnet_lite_weights_path,
                                   load_efficientnet_lite0_imagenet, load_efficientnet_lite_imagenet,
                                   map_efficientnet_lite0_state_dict, map_efficientnet_lite_state_dict)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IMAGE = DATA / "dubai_hitl_aerial" / "tile_1" / "images" / "image_part_001.jpg"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Feature tolerance: 1e-4 of the feature map's own scale (max |value|, at least 1).
REL_TOL = 1e-4


def _new_encoder(name: str = EFFICIENTNET_LITE0_ENCODER):
    return smp.encoders.get_encoder(name, in_channels=3, depth=5, weights=None)


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) float32, ImageNet mean/std."""
    x = (rgb.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _imagenet_224(image) -> torch.Tensor:
    """ImageNet evaluation protocol: shorter side to 256 (bicubic), centre crop 224."""
    from PIL import Image

    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return _normalise(np.asarray(image.crop((left, top, left + 224, top + 224))))


def _native_crop(image, height: int, width: int) -> torch.Tensor:
    """Centre crop at native resolution (how the engine tiles rasters), any size."""
    rgb = np.asarray(image)
    top, left = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    return _normalise(rgb[top:top + height, left:left + width])


@pytest.fixture(scope="module")
def image():
    if not IMAGE.is_file():
        pytest.skip(f"test image not available: {IMAGE}")
    from PIL import Image

    with Image.open(IMAGE) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def reference_sd():
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


def _reference_model(name: str, state_dict):
    """The reference model ``name`` (``efficientnet-lite0``, ``-lite2``) with ``state_dict``; image_size=None
    selects its dynamic TF-"SAME" padding (any input size)."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    model = ref_pkg.EfficientNet.from_name(name, image_size=None)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference(reference_sd):
    return _reference_model("efficientnet-lite0", reference_sd)


@pytest.fixture(scope="module")
def encoder():
    enc = _new_encoder()
    load_efficientnet_lite0_imagenet(enc)
    return enc.eval()


def _reference_stage_outputs(reference, x: torch.Tensor, repeats=LITE0_STAGE_REPEATS) -> dict:
    """Output of the last block of every stage of the reference (hooks on its flat ``_blocks``)."""
    stage_ends = [n - 1 for n in itertools.accumulate(repeats)]  # Lite0: 0, 2, 4, 7, 10, 14, 15
    outputs, handles = {}, []
    for stage, block in enumerate(stage_ends):
        handles.append(reference._blocks[block].register_forward_hook(
            lambda _m, _i, out, stage=stage: outputs.__setitem__(stage, out)))
    try:
        with torch.no_grad():
            reference.extract_features(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype == torch.float32
    scale = max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= REL_TOL * scale, f"{what}: max |diff| {diff:.3g} > {REL_TOL:g} × scale {scale:.3g}"
    return diff


@pytest.mark.parametrize("size", ["imagenet224", (512, 512), (201, 263)], ids=str)
def test_multiscale_features_match_reference(image, reference, encoder, size):
    x = _imagenet_224(image) if size == "imagenet224" else _native_crop(image, *size)
    h, w = x.shape[-2:]
    with torch.no_grad():
        feats = encoder(x)
    ref = _reference_stage_outputs(reference, x)

    info = encoder.model.feature_info
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert encoder.out_channels == [3, 16, 24, 40, 112, 320]
    # smp returns [input, stride 2, 4, 8, 16, 32]; timm names the stage each feature is taken after.
    for feat, module, stride in zip(feats[1:], info.module_name(), info.reduction()):
        stage = int(module.split(".")[1])
        assert feat.shape[-2:] == (-(-h // stride), -(-w // stride))  # ceil: TF "SAME" output size
        _assert_close(feat, ref[stage], f"stride {stride} ({module}) at {h}x{w}")


def test_head_features_and_logits_match_reference(image, reference):
    """The head (conv 1×1 → 1280 + BN + ReLU6) and classifier, on a full timm model via the same mapping."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_efficientnet_lite0_imagenet(model)
    model.eval()
    x = _imagenet_224(image)
    with torch.no_grad():
        ours_head, ref_head = model.forward_features(x), reference.extract_features(x)
        ours_logits, ref_logits = model(x), reference(x)
    _assert_close(ours_head, ref_head, "head features")
    _assert_close(ours_logits, ref_logits, "logits")
    assert ours_logits.argmax().item() == ref_logits.argmax().item()


def test_mapping_covers_every_encoder_key(reference_sd):
    enc = _new_encoder()
    own = enc.state_dict()
    mapped = map_efficientnet_lite0_state_dict(reference_sd, enc)
    assert list(mapped) == list(own)
    for key, value in mapped.items():
        assert value.shape == own[key].shape, key
    # Every mapped tensor is a distinct reference tensor (a bijection onto the reference's stem+blocks).
    ids = {id(v) for v in mapped.values()}
    assert len(ids) == len(mapped)
    ref_ids = {id(v): k for k, v in reference_sd.items()}
    used = {ref_ids[id(v)] for v in mapped.values()}
    dropped = set(reference_sd) - used
    assert {k.split(".", 1)[0] for k in dropped} == {"_conv_head", "_bn1", "_fc"}
    # strict=True loads, and no encoder tensor keeps its random initialisation.
    enc.load_state_dict(mapped, strict=True)
    for key, value in enc.state_dict().items():
        assert torch.equal(value, reference_sd[ref_ids[id(mapped[key])]]), key


def test_wrong_shape_raises_value_error(reference_sd):
    bad = dict(reference_sd)
    bad["_blocks.5._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # stage 2 is 5×5
    with pytest.raises(ValueError, match=r"_blocks\.5\._depthwise_conv\.weight"):
        map_efficientnet_lite0_state_dict(bad, _new_encoder())


@pytest.mark.parametrize("corruption", ["missing", "unexpected"])
def test_incomplete_or_foreign_reference_raises_value_error(reference_sd, corruption):
    bad = dict(reference_sd)
    if corruption == "missing":
        del bad["_blocks.9._bn1.running_var"]
        pattern = r"_blocks\.9\._bn1\.running_var"
    else:  # squeeze-excitation weights: an EfficientNet-B0 checkpoint, not Lite0
        bad["_blocks.1._se_reduce.weight"] = torch.zeros(4, 96, 1, 1)
        pattern = r"_se_reduce"
    with pytest.raises(ValueError, match=pattern):
        map_efficientnet_lite0_state_dict(bad, _new_encoder())


def test_symmetric_padding_variant_is_refused_and_would_be_wrong(image, reference, reference_sd):
    """Why ``tf_``: timm's ``efficientnet_lite0`` (symmetric padding, BN eps 1e-5) has the same shapes,
    so the tensors load silently, but its features are far off; the loader refuses it."""
    sym = _new_encoder("tu-efficientnet_lite0")
    with pytest.raises(ValueError, match="SAME"):
        load_efficientnet_lite0_imagenet(sym)
    sym.load_state_dict(map_efficientnet_lite0_state_dict(reference_sd, sym), strict=True)
    x = _imagenet_224(image)
    with torch.no_grad():
        last = sym.eval()(x)[-1]
    expected = _reference_stage_outputs(reference, x)[len(LITE0_STAGE_REPEATS) - 1]
    assert (last - expected).abs().max().item() > 0.1 * expected.abs().max().item()


def test_missing_weights_file_raises_file_not_found(tmp_path):
    assert efficientnet_lite0_weights_path().is_file()
    with pytest.raises(FileNotFoundError):
        load_efficientnet_lite0_imagenet(_new_encoder(), tmp_path / "absent.pth")


# --- EfficientNet-Lite2: the same mapping, another layout (21 blocks, 1-3-3-4-4-5-1), the same bar. ---

LITE2 = "efficientnet_lite2"


@pytest.fixture(scope="module")
def lite2_reference_sd():
    return torch.load(efficientnet_lite_weights_path(LITE2), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite2_reference(lite2_reference_sd):
    return _reference_model("efficientnet-lite2", lite2_reference_sd)


def test_lite2_layout_is_the_tf_builders():
    """Depth 1.2, the first and last stage kept (Lite's fix_head_stem): ceil(1.2 × r) for the others."""
    assert EFFICIENTNET_LITE[LITE2].repeats == (1,) + tuple(-(-r * 12 // 10) for r in (2, 2, 3, 3, 4)) + (1,)
    enc = _new_encoder(EFFICIENTNET_LITE[LITE2].encoder)
    assert enc.out_channels == [3, 16, 24, 48, 120, 352]


@pytest.mark.parametrize("size", ["imagenet224", (201, 263)], ids=str)
def test_lite2_features_match_reference(image, lite2_reference, size):
    from core.model.backbones import build_encoder

    encoder, channels = build_encoder(LITE2, "imagenet")  # the engine's own path to the weights
    encoder.eval()
    assert channels == (24, 48, 120, 352)
    x = _imagenet_224(image) if size == "imagenet224" else _native_crop(image, *size)
    with torch.no_grad():
        feats = encoder(x)
    ref = _reference_stage_outputs(lite2_reference, x, EFFICIENTNET_LITE[LITE2].repeats)
    info = encoder.model.feature_info
    for feat, module, stride in zip(feats[1:], info.module_name(), info.reduction()):
        _assert_close(feat, ref[int(module.split(".")[1])], f"Lite2 stride {stride} ({module})")


def test_lite2_logits_match_reference(image, lite2_reference):
    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    load_efficientnet_lite_imagenet(model, LITE2)
    model.eval()
    x = _imagenet_224(image)
    with torch.no_grad():
        ours, ref = model(x), lite2_reference(x)
    _assert_close(ours, ref, "Lite2 logits")
    assert ours.argmax().item() == ref.argmax().item()


def test_weights_of_the_other_variant_are_refused(reference_sd, lite2_reference_sd):
    lite2 = _new_encoder(EFFICIENTNET_LITE[LITE2].encoder)
    with pytest.raises(ValueError, match="efficientnet_lite0 has"):
        map_efficientnet_lite_state_dict(reference_sd, lite2, "efficientnet_lite0")  # Lite2 encoder, Lite0 table
    with pytest.raises(ValueError, match="Shape mismatch"):  # Lite0 weights into Lite2's table: channels differ
        map_efficientnet_lite_state_dict(reference_sd, lite2, LITE2)
    with pytest.raises(ValueError, match="efficientnet_lite2 has"):
        map_efficientnet_lite_state_dict(lite2_reference_sd, _new_encoder(), LITE2)
