"""The one class table (issue 10): every reader gives a class without a prompt the same prompt, the
vocabulary's concept prompt that the model's text bank uses."""
from __future__ import annotations

import json

import pytest

from core.classtable import ClassTable, default_prompt, load_class_table, normalise_class_table
from core.errors import InputError
from core.model.text.prompts import PROMPT_TEMPLATE, concept_for_class


def test_a_class_without_prompt_gets_the_vocabularys_concept_in_every_reader(tmp_path):
    entries = [{"name": "barren"}, {"name": "Greenhouse"}, {"name": "water", "prompt": "my own prompt"}]
    # the vocabulary maps LoveDA's "barren" to the concept "bare land"; an unknown name stands for itself
    assert concept_for_class("barren") == "bare land"
    expected = [PROMPT_TEMPLATE.format(concept="bare land"), PROMPT_TEMPLATE.format(concept="greenhouse"),
                "my own prompt"]
    assert [default_prompt(e["name"]) for e in entries[:2]] == expected[:2]
    p = tmp_path / "classes.json"
    p.write_text(json.dumps({"classes": entries}))
    assert ClassTable(entries).prompts == expected               # fine-tuning's label reader
    assert load_class_table(p).prompts == expected               # ... from a file
    assert [c["prompt"] for c in normalise_class_table(entries)] == expected  # the head's class adaptation
    # before issue 10 the label reader said "A satellite image of barren": not what the text bank knows
    assert ClassTable(entries).prompts[0] != PROMPT_TEMPLATE.format(concept="barren")


def test_one_palette_for_classes_without_colour():
    entries = [{"name": f"c{i}"} for i in range(3)]
    assert [c.colour for c in ClassTable(entries)] == [c["colour"] for c in normalise_class_table(entries)]
    with pytest.raises(InputError, match="colour"):
        normalise_class_table([{"name": "x", "colour": "#12345G"}])
