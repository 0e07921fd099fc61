"""One definition of the index rules: a JSONL line means the same caption, person and image to preprocessing
(get_face_info.py's sources) and to training (faceid.train.records), and the official drop-in names exist."""

from __future__ import annotations

import json

import pytest

from faceid import schema
from faceid.prep.sources import iter_source_items
from faceid.train.records import read_records

LINES = [
    # MFaceTech: the caption is additional_feature; a seed-style text field beside it must not win in one
    # reader and lose in the other.
    {"file_name": "a.png", "additional_feature": "a woman, smiling", "text": "other", "id_name": "p1",
     "insightface_feature_file": "a.bin"},
    {"image_file": "b.png", "text": "a man with glasses", "identity_id": "p2", "embedding_file": "b.npy"},
    {"image": "c.png", "caption": "portrait", "additional_feature": "x", "person": 7, "identity": 9,
     "embedding": {"file": "e.npy", "row": 0}},
    {"image": "d.png", "prompt": "only a prompt", "embedding": {"file": "e.npy", "row": 1}},
]  # fmt: skip


@pytest.mark.parametrize("line", LINES)
def test_one_jsonl_line_same_caption_and_person_everywhere(tmp_path, line):
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps(line) + "\n")
    (item,) = list(iter_source_items(index))
    (records, bad) = read_records(str(index))
    assert bad == []
    (rec,) = records
    assert item.caption == rec.caption == schema.caption_of(line) != ""
    assert item.person_id == rec.person_id == schema.person_of(line)
    assert item.image == rec.image == str(tmp_path / schema.image_of(line))


def test_expected_values_of_the_rule():
    assert [schema.caption_of(x) for x in LINES] == [
        "a woman, smiling",
        "a man with glasses",
        "portrait",
        "only a prompt",
    ]
    assert [schema.person_of(x) for x in LINES] == ["p1", "p2", "7", None]


def test_official_drop_in_names():
    from ip_adapter.attention_processor import (
        AttnProcessor,
        AttnProcessor2_0,
        IPAttnProcessor,
        IPAttnProcessor2_0,
    )
    from ip_adapter.utils import is_torch2_available

    assert is_torch2_available() is True
    assert AttnProcessor2_0 is AttnProcessor and IPAttnProcessor2_0 is IPAttnProcessor
    proc = IPAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, scale=0.5, num_tokens=4)
    assert proc.to_k_ip.weight.shape == (64, 32) and proc.to_v_ip.weight.shape == (64, 32)


def test_packages_import_no_top_level_script_and_ip_adapter_no_faceid():
    """Arrows point down: packages never import the flat scripts; ip_adapter stands alone."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = {p.stem for p in root.glob("*.py")}
    offenders = []
    for pkg in ("faceid", "ip_adapter"):
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module.split(".")[0]]
                for name in names:
                    if name in scripts or (pkg == "ip_adapter" and name == "faceid"):
                        offenders.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    assert offenders == []
