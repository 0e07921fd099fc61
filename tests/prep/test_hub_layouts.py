"""The Hub's dataset layouts as sources: parquet (``datasets`` Image structs or plain bytes, metadata columns,
several files, a corrupt file), imagefolder (metadata.jsonl / metadata.csv in sub-folders), and person ids from a
column, a file-name pattern or the folder."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest_face import face_image
from conftest_mine import png_bytes

import get_face_info as gfi
from faceid.prep.sources import SourceError, detect_kind, iter_source_items


def _png(seed: int = 1) -> bytes:
    return png_bytes(face_image(patterns=[seed]))


def test_parquet_structs_bytes_columns_and_person_column(tmp_path):
    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    t1 = pa.Table.from_pylist([
        {"image": {"bytes": _png(1), "path": "celeb_a/001.png"}, "text": "a man", "celebrity": "A"},
        {"image": {"bytes": _png(2), "path": "celeb_b/002.png"}, "text": "a woman", "celebrity": "B"},
        {"image": {"bytes": None, "path": None}, "text": "no picture", "celebrity": "C"},
    ])  # fmt: skip
    pq.write_table(t1, root / "data" / "train-00000-of-00002.parquet", row_group_size=2)
    t2 = pa.Table.from_pylist([{"jpg": _png(3), "caption": "plain bytes column", "person_id": 7}])
    pq.write_table(t2, root / "data" / "train-00001-of-00002.parquet")
    assert detect_kind(root) == "parquet"
    items = list(iter_source_items(root, person_column="celebrity"))
    assert [i.key for i in items] == [
        "data/train-00000-of-00002.parquet:0",
        "data/train-00000-of-00002.parquet:1",
        "data/train-00000-of-00002.parquet:2",
        "data/train-00001-of-00002.parquet:0",
    ]
    assert items[0].data == _png(1) and items[0].caption == "a man" and items[0].person_id == "A"
    assert items[2].error.startswith("missing_field") and items[3].caption == "plain bytes column"
    assert items[3].person_id is None  # the person column was named: "celebrity" only
    assert list(iter_source_items(root))[3].person_id == "7"  # default person fields
    by_folder = list(iter_source_items(root, person_from_folder=True))
    assert [i.person_id for i in by_folder[:2]] == ["celeb_a", "celeb_b"]  # the folder of the row's file name
    pattern = list(iter_source_items(root, person_pattern=r"celeb_(\w)/"))
    assert [i.person_id for i in pattern[:2]] == ["a", "b"]


def test_imagefolder_metadata_jsonl_and_csv(tmp_path):
    root = tmp_path / "faces"
    for split in ("train", "test"):
        (root / split / "sub").mkdir(parents=True)
    face_image().save(root / "train" / "sub" / "jo_1.png")
    face_image().save(root / "train" / "ann_2.png")
    (root / "train" / "metadata.jsonl").write_text(
        '{"file_name": "sub/jo_1.png", "text": "jo at the beach", "name": "jo"}\n'
        '{"file_name": "ann_2.png", "text": "ann"}\n{"text": "no file"}\n'
    )
    face_image().save(root / "test" / "bo_1.png")
    (root / "test" / "metadata.csv").write_text('file_name,caption,name\nbo_1.png,"bo, smiling",bo\n')
    assert detect_kind(root) == "imagefolder" and detect_kind(root / "test" / "metadata.csv") == "imagefolder"
    items = list(iter_source_items(root, person_column="name"))
    assert [i.key for i in items] == [
        "test/bo_1.png",
        "train/sub/jo_1.png",
        "train/ann_2.png",
        "train/metadata.jsonl:3",
    ]
    assert items[0].caption == "bo, smiling" and items[0].person_id == "bo" and items[1].person_id == "jo"
    assert items[2].person_id is None and items[3].error.startswith("missing_field")
    named = list(iter_source_items(root, person_pattern=r"(?P<person>[a-z]+)_\d"))
    assert [i.person_id for i in named[:3]] == ["bo", "jo", "ann"]
    folder = list(iter_source_items(root, person_from_folder=True))
    assert folder[1].person_id == "train/sub" and folder[2].person_id == "train"


def test_bad_hub_inputs_clear_messages(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-00000.parquet").write_bytes(b"PAR1 this is not really parquet")
    argv = ["--input", str(bad), "--output", str(tmp_path / "o"), "--root", str(tmp_path)]
    assert gfi.main(gfi.parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert "train-00000.parquet: not a readable parquet file" in err and "Traceback" not in err
    no_img = tmp_path / "noimg"
    no_img.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": "x", "n": 1}]), no_img / "a.parquet")
    assert gfi.main(gfi.parse_args(["--input", str(no_img), *argv[2:]])) == 2
    assert "no image column" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gfi.main(gfi.parse_args(["--input", str(empty), "--source_kind", "imagefolder", *argv[2:]])) == 2
    assert "no metadata.jsonl / metadata.csv" in capsys.readouterr().err
    with pytest.raises(SourceError, match="no column 'pix'"):
        list(iter_source_items(no_img, image_column="pix"))
    with pytest.raises(SystemExit):
        gfi.parse_args([*argv, "--person_pattern", "(unclosed"])
