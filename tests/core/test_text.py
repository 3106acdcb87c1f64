"""The SRMF text bank (general representation knowledge injection, arXiv 2504.19839): vocabulary,
encoders (real MiniLM weights, real open_clip tokenizer with a tiny random CLIP), and the cache.

Offline: every test runs with sockets blocked. Nothing downloads weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from types import SimpleNamespace

from core.model.text import bank, encoders, prompts

T = SimpleNamespace(**{**vars(prompts), **vars(encoders), **vars(bank)})  # the text bank's three modules, as one

DUBAI_CLASSES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dubai_hitl_aerial" / "classes.json"

DATASET_CLASSES = {
    "URUR": ["background", "building", "farmland", "greenhouse", "woodland", "bareland", "water", "road"],
    "GID-5": ["built-up", "farmland", "forest", "meadow", "water"],
    "GID-15": ["industrial land", "urban residential", "rural residential", "traffic land", "paddy field",
               "irrigated land", "dry cropland", "garden plot", "arbor woodland", "shrub land",
               "natural grassland", "artificial grassland", "river", "lake", "pond"],
    "FBP": ["industrial area", "paddy field", "irrigated field", "dry cropland", "garden land", "arbor forest",
            "shrub forest", "park", "natural meadow", "artificial meadow", "river", "urban residential", "lake",
            "pond", "fish pond", "snow", "bareland", "rural residential", "stadium", "square", "road",
            "overpass", "railway station", "airport"],
    "LoveDA": ["background", "building", "road", "water", "barren", "forest", "agriculture"],
    "ISPRS": ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"],
    "Dubai": ["Water", "Land (unpaved area)", "Road", "Building", "Vegetation"],
}

TINY_CLIP_CFG = {  # a CLIP with a 1-layer, 32-wide text tower; the real 49408-token BPE vocabulary
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_ARCH = "srmf-test-tiny-clip"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


class Counting:
    """Wraps an encoder and records every encode call."""

    def __init__(self, inner):
        self.inner = inner
        self.encoder_id = inner.encoder_id
        self.dim = inner.dim
        self.calls = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


class HashEncoder:
    """Deterministic stand-in encoder (no model): a prompt's sha256 bytes as a vector."""

    def __init__(self, encoder_id="test/hash", dim=16):
        self.encoder_id = encoder_id
        self.dim = dim

    def encode(self, prompts):
        rows = [torch.tensor(list(hashlib.sha256(p.encode()).digest()[:self.dim]), dtype=torch.float32) - 127.5
                for p in prompts]
        return torch.stack(rows)


@pytest.fixture(scope="module")
def minilm():
    return T.MiniLMTextEncoder()


@pytest.fixture(scope="module")
def vocabulary():
    return T.load_vocabulary()


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    import open_clip
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder)
    assert TINY_ARCH in open_clip.list_models()
    return TINY_ARCH


@pytest.fixture
def tiny_clip(tiny_arch):
    import open_clip
    torch.manual_seed(0)
    return open_clip.create_model(tiny_arch, pretrained=None, device="cpu", precision="fp32")


def assert_unit_rows(bank, n, d):
    assert bank.shape == (n, d)
    assert bank.dtype == torch.float32
    assert not bank.requires_grad and not bank.is_inference()
    assert torch.isfinite(bank).all()
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(n), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- vocabulary

def test_vocabulary_has_at_least_54_unique_lower_case_concepts(vocabulary):
    assert len(vocabulary) >= 54
    assert len(set(vocabulary)) == len(vocabulary)
    assert all(c == c.lower().strip() and c for c in vocabulary)
    doc = json.loads(T.DEFAULT_VOCABULARY.read_text(encoding="utf-8"))
    assert doc["template"] == T.PROMPT_TEMPLATE == "A satellite image of {concept}"
    for general in ("snow", "ice", "cloud", "wetland"):
        assert general in vocabulary


@pytest.mark.parametrize("dataset", sorted(DATASET_CLASSES))
def test_vocabulary_covers_dataset_class_names(vocabulary, dataset):
    missing = {name: T.concept_for_class(name) for name in DATASET_CLASSES[dataset]
               if T.concept_for_class(name) not in vocabulary}
    assert not missing, f"{dataset} classes without a concept: {missing}"


def test_vocabulary_covers_real_dubai_classes_file(vocabulary):
    if not DUBAI_CLASSES.is_file():
        pytest.skip(f"{DUBAI_CLASSES} not present")
    names = [c["title"] for c in json.loads(DUBAI_CLASSES.read_text())["classes"]]
    assert "Land (unpaved area)" in names
    for name in names:
        assert T.concept_for_class(name) in vocabulary, name
    assert T.concept_for_class("Land (unpaved area)") == "unpaved land"
    assert T.concept_for_class("barren") == "bare land"
    assert T.concept_for_class("Solar  Farm") == "solar farm"  # custom class: its own concept


def test_prompts_for():
    assert T.prompts_for(["paddy field", "water"]) == ["A satellite image of paddy field", "A satellite image of water"]
    with pytest.raises(ValueError):
        T.prompts_for(["water", ""])
    with pytest.raises(ValueError):
        T.prompts_for("water")
    with pytest.raises(ValueError):
        T.prompts_for(["water"], template="no placeholder")


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    ("{not json", "cannot read"),
    ('{"template": "A satellite image of {concept}", "concepts": []}', "non-empty"),
    ('{"template": "A satellite image of {concept}", "concepts": ["water", "water"]}', "twice"),
    ('{"template": "A satellite image of {concept}", "concepts": ["Water"]}', "lower case"),
    ('{"template": "A satellite image", "concepts": ["water"]}', "{concept}"),
    ('{"concepts": ["water"], "aliases": {"lake": "pond"}}', "alias"),
])
def test_load_vocabulary_rejects_bad_files(tmp_path, content, needle):
    path = tmp_path / "concepts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="concepts.json") as err:
        T.load_vocabulary(path)
    assert needle in str(err.value)


# ---------------------------------------------------------------------------------------- MiniLM

def test_minilm_bank_of_the_vocabulary(minilm, vocabulary, tmp_path):
    prompts = T.prompts_for(vocabulary)
    bank = T.build_text_bank(prompts, minilm, cache_dir=tmp_path)
    assert_unit_rows(bank, len(vocabulary), 384)
    assert minilm.encoder_id == "sentence-transformers/all-MiniLM-L6-v2" and minilm.dim == 384
    model = minilm.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    sim = bank @ bank.T
    i = {c: k for k, c in enumerate(vocabulary)}

    def s(a, b):
        return float(sim[i[a], i[b]])

    # Related land covers are closer than unrelated ones, by a clear margin.
    assert s("water", "river") > s("water", "building") + 0.1
    assert s("forest", "trees") > s("forest", "road") + 0.1
    assert s("paddy field", "farmland") > s("paddy field", "airport") + 0.1
    assert s("snow", "ice") > s("snow", "industrial area") + 0.1
    # The bank rows are the normalised encoder outputs.
    raw = minilm.encode(prompts[:3])
    torch.testing.assert_close(bank[:3], torch.nn.functional.normalize(raw, dim=1), atol=1e-6, rtol=0)


def test_bank_from_cache_is_bit_identical_without_encoding(minilm, vocabulary, tmp_path):
    prompts = T.prompts_for(vocabulary)
    first = Counting(minilm)
    bank1 = T.build_text_bank(prompts, first, cache_dir=tmp_path)
    assert first.calls == [prompts]

    second = Counting(minilm)
    bank2 = T.build_text_bank(prompts, second, cache_dir=tmp_path)
    assert second.calls == []
    assert torch.equal(bank1, bank2)
    assert bank1.numpy().tobytes() == bank2.numpy().tobytes()

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [T.cache_file(minilm.encoder_id, tmp_path).name]
    assert files[0].endswith(".safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / files[0]), framework="pt") as f:
        assert f.metadata()["encoder_id"] == minilm.encoder_id
        assert set(f.keys()) == {T.prompt_key(p) for p in prompts}

    # A reordered subset is also served from the cache, rows equal to the full bank's.
    third = Counting(minilm)
    subset = [prompts[5], prompts[0], prompts[5]]
    bank3 = T.build_text_bank(subset, third, cache_dir=tmp_path)
    assert third.calls == []
    assert torch.equal(bank3, bank1[[5, 0, 5]])


def test_appended_prompt_is_the_only_one_encoded(minilm, vocabulary, tmp_path):
    prompts = T.prompts_for(vocabulary)
    bank1 = T.build_text_bank(prompts, minilm, cache_dir=tmp_path)
    new = T.prompts_for(["solar farm"])[0]
    counting = Counting(minilm)
    bank2 = T.build_text_bank(prompts + [new], counting, cache_dir=tmp_path)
    assert counting.calls == [[new]]
    assert bank2.shape == (len(prompts) + 1, 384)
    assert torch.equal(bank2[:-1], bank1)
    assert_unit_rows(bank2, len(prompts) + 1, 384)
    again = Counting(minilm)
    assert torch.equal(T.build_text_bank(prompts + [new], again, cache_dir=tmp_path), bank2)
    assert again.calls == []
    assert not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------------------------------- cache details

def test_cache_is_per_encoder(tmp_path):
    prompts = ["A satellite image of water", "A satellite image of road"]
    a, b = Counting(HashEncoder("test/a")), Counting(HashEncoder("test/b", dim=8))
    bank_a = T.build_text_bank(prompts, a, cache_dir=tmp_path)
    bank_b = T.build_text_bank(prompts, b, cache_dir=tmp_path)
    assert len(a.calls) == 1 and len(b.calls) == 1
    assert bank_a.shape == (2, 16) and bank_b.shape == (2, 8)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_duplicate_prompts_are_encoded_once(tmp_path):
    enc = Counting(HashEncoder())
    bank = T.build_text_bank(["x", "y", "x"], enc, cache_dir=tmp_path)
    assert enc.calls == [["x", "y"]]
    assert torch.equal(bank[0], bank[2])


def test_corrupt_cache_is_rebuilt(tmp_path, caplog):
    prompts = ["A satellite image of water", "A satellite image of road"]
    fresh = T.build_text_bank(prompts, HashEncoder(), cache_dir=tmp_path / "fresh")
    path = T.cache_file("test/hash", tmp_path)
    path.write_bytes(b"not a safetensors file")
    enc = Counting(HashEncoder())
    with caplog.at_level("WARNING"):
        bank = T.build_text_bank(prompts, enc, cache_dir=tmp_path)
    assert torch.equal(bank, fresh)
    assert len(enc.calls) == 1 and "unreadable" in caplog.text
    assert torch.equal(T.build_text_bank(prompts, Counting(HashEncoder()), cache_dir=tmp_path), fresh)


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SRMF_CACHE_DIR", str(tmp_path))
    assert T.default_cache_dir() == tmp_path / "text_bank"
    enc = Counting(HashEncoder())
    T.build_text_bank(["a"], enc)
    assert (tmp_path / "text_bank" / T.cache_file("test/hash", ".").name).is_file()
    monkeypatch.delenv("SRMF_CACHE_DIR")
    assert T.default_cache_dir() == Path.home() / ".cache" / "srmf" / "text_bank"


def test_build_text_bank_input_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        T.build_text_bank([], HashEncoder(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="single string"):
        T.build_text_bank("A satellite image of water", HashEncoder(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not a text encoder"):
        T.build_text_bank(["a"], object(), cache_dir=tmp_path)

    class Broken(HashEncoder):
        def encode(self, prompts):
            return torch.zeros(len(prompts), self.dim)
    with pytest.raises(RuntimeError, match="zero vector"):
        T.build_text_bank(["a"], Broken("test/broken"), cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------- open_clip

def test_open_clip_tiny_model_with_real_tokenizer(tiny_clip, tiny_arch, vocabulary, tmp_path):
    import open_clip
    enc = T.OpenCLIPTextEncoder(tiny_arch, model=tiny_clip)
    assert enc.dim == 32
    assert enc.encoder_id.startswith(f"open_clip:{tiny_arch}:text-sha256-")
    assert isinstance(enc.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    tokens = enc.tokenizer(["A satellite image of water"])
    assert tokens.shape == (1, 77)
    assert tokens[0, 0] == 49406 and 49407 in tokens[0].tolist()  # the real BPE's <start>/<end> tokens
    assert not tiny_clip.training and not any(p.requires_grad for p in tiny_clip.parameters())

    prompts = T.prompts_for(vocabulary)
    bank = T.build_text_bank(prompts, enc, cache_dir=tmp_path)
    assert_unit_rows(bank, len(prompts), 32)
    with torch.no_grad():
        expected = tiny_clip.encode_text(open_clip.get_tokenizer("ViT-B-32")(prompts))
    torch.testing.assert_close(bank, torch.nn.functional.normalize(expected, dim=1), atol=1e-6, rtol=0)
    assert len(torch.unique(bank, dim=0)) == len(prompts)

    counting = Counting(enc)
    assert torch.equal(T.build_text_bank(prompts, counting, cache_dir=tmp_path), bank)
    assert counting.calls == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_local_checkpoint(tiny_clip, tiny_arch, tmp_path, suffix):
    from safetensors.torch import save_file
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, str(path))

    enc = T.get_text_encoder(f"open_clip:{tiny_arch}:{path}")
    assert isinstance(enc, T.OpenCLIPTextEncoder) and enc.dim == 32
    assert enc.encoder_id.startswith(f"open_clip:{tiny_arch}:file-sha256-")
    assert enc._model is None  # lazy: nothing loaded yet
    prompts = ["A satellite image of water", "A satellite image of paddy field"]
    reference = T.OpenCLIPTextEncoder(tiny_arch, model=tiny_clip).encode(prompts)
    torch.testing.assert_close(enc.encode(prompts), reference, atol=1e-6, rtol=0)
    assert enc.model.visual is None and not enc.model.training


class _Payload:
    """Unpickling this runs os.makedirs(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_open_clip_checkpoint_is_never_fully_unpickled(tiny_arch, tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"token_embedding.weight": torch.zeros(2)}, "x": _Payload(str(marker))}, str(path))
    enc = T.OpenCLIPTextEncoder(tiny_arch, str(path))
    with pytest.raises(ValueError, match="evil.pt"):
        enc.encode(["A satellite image of water"])
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pt"):
        T.load_checkpoint_state_dict(path)
    assert not marker.exists()
    torch.load(str(path), weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.is_dir()


def test_open_clip_tag_is_lazy_and_served_from_cache(tmp_path):
    enc = T.get_text_encoder("open_clip:ViT-H-14:laion2b_s32b_b79k")  # the paper's encoder
    assert enc.encoder_id == "open_clip:ViT-H-14:laion2b_s32b_b79k" and enc.dim == 1024
    prompts = ["A satellite image of water", "A satellite image of road"]
    seeded = T.build_text_bank(prompts, _Fixed(enc.encoder_id, 1024), cache_dir=tmp_path)
    # No download, no load: every prompt is in the cache (and sockets are blocked).
    assert torch.equal(T.build_text_bank(prompts, enc, cache_dir=tmp_path), seeded)
    assert enc._model is None


class _Fixed:
    def __init__(self, encoder_id, dim):
        self.encoder_id, self.dim = encoder_id, dim

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        return torch.randn(len(prompts), self.dim, generator=g)


# ---------------------------------------------------------------------------------------- specs

def test_get_text_encoder_default_is_minilm():
    for spec in (None, "", "minilm", "MiniLM", "sentence-transformers/all-MiniLM-L6-v2"):
        enc = T.get_text_encoder(spec)
        assert isinstance(enc, T.MiniLMTextEncoder) and enc.dim == 384


@pytest.mark.parametrize("spec", [
    "clip", "open_clip", "open_clip:ViT-H-14", "open_clip::laion2b_s32b_b79k", "open_clip:NoSuchArch:x",
    "open_clip:ViT-H-14:no_such_tag", "open_clip:ViT-H-14:/no/such/file.safetensors",
])
def test_bad_spec_raises_value_error(spec):
    with pytest.raises(ValueError) as err:
        T.get_text_encoder(spec)
    msg = str(err.value)
    assert spec in msg or spec.split(":")[1] in msg or spec.split(":")[-1] in msg


def test_unsupported_checkpoint_suffix(tiny_arch, tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint type"):
        T.get_text_encoder(f"open_clip:{tiny_arch}:{path}")
