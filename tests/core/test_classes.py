"""Custom classes on a base model: the bank and head grow as specified, old predictions unchanged."""
from __future__ import annotations

import pytest
import torch

from conftest import make_random_model
from core.model.adapt import adapt_classes
from core.classtable import normalise_class_table
from core.errors import InputError
from core.model.modelfile import load_model


class CountingEncoder:
    """A deterministic stand-in text encoder of the model's D (the real encoders are tested in test_text)."""

    encoder_id = "test-encoder"
    dim = 32

    def __init__(self):
        self.calls = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(len(prompts), self.dim, generator=g)


@pytest.fixture
def base(tmp_path):
    return load_model(make_random_model(tmp_path / "base.srmf", n_concepts=12, dim=32))


def test_adding_a_class_grows_bank_and_fusion_and_keeps_old_logits(base, tmp_path, monkeypatch):
    monkeypatch.setenv("SRMF_CACHE_DIR", str(tmp_path / "cache"))
    enc = CountingEncoder()
    new = [dict(c) for c in base.classes] + [{"name": "swimming pool", "colour": "#00ffff"}]
    feat = torch.randn(256)
    model, header, report = adapt_classes(base.model, base.header, new, text_encoder=enc,
                                          init_features={"swimming pool": feat})
    assert report["added"] == ["swimming pool"] and report["dropped"] == []
    assert report["appended_prompts"] == ["A satellite image of swimming pool"]
    assert enc.calls == [["A satellite image of swimming pool"]]
    head, old = model.head, base.model.head
    assert head.text_bank.shape == (13, 32) and torch.equal(head.text_bank[:12], old.text_bank)
    assert head.fusion[0].in_channels == old.fusion[0].in_channels + 1
    assert torch.count_nonzero(head.fusion[0].weight[:, -1]) == 0  # zero-initialised new input
    assert head.classifier.out_channels == 6
    assert header["text_bank"]["prompts"][-1] == "A satellite image of swimming pool"
    assert [c["name"] for c in header["classes"]][-1] == "swimming pool" and header["classes"][-1]["id"] == 5
    # the new row points along the class's mean feature, at the old rows' mean norm
    w = head.classifier.weight[5].detach().flatten()
    assert torch.nn.functional.cosine_similarity(w, feat, dim=0) > 0.999
    assert w.norm().item() == pytest.approx(old.classifier.weight.flatten(1).norm(dim=1).mean().item(), rel=1e-4)
    model.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        before, after = base.model(x), model(x)
    assert torch.equal(after[:, :5], before)


def test_rename_drop_and_reorder_keep_rows(base):
    new = [{"name": "water"}, {"name": "built-up", "from": "building"}]
    model, header, report = adapt_classes(base.model, base.header, new)
    assert report["dropped"] == ["land", "road", "vegetation"] and report["renamed"] == ["building -> built-up"]
    cls_old, cls_new = base.model.head.classifier, model.head.classifier
    assert torch.equal(cls_new.weight[0], cls_old.weight[4]) and torch.equal(cls_new.weight[1], cls_old.weight[0])
    assert torch.equal(cls_new.bias, cls_old.bias[[4, 0]])
    assert model.head.text_bank.shape == base.model.head.text_bank.shape  # nothing appended
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), base.model(x)[:, [4, 0]])


@pytest.mark.parametrize("table,words", [
    ([], "empty"),
    ([{"name": "a"}, {"name": "A"}], "twice"),
    ([{"name": ""}], "no name"),
    ([{"name": "a", "colour": "red"}], "#rrggbb"),
])
def test_bad_class_tables(table, words):
    with pytest.raises(InputError) as info:
        normalise_class_table(table)
    assert words in str(info.value).lower()


def test_from_must_name_a_base_class(base):
    with pytest.raises(InputError, match="'from' names 'forest'"):
        adapt_classes(base.model, base.header, [{"name": "trees", "from": "forest"}])
