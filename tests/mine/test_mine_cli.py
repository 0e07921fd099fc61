"""mine_identities.py on an index of synthetic embeddings: the new index (keys, paths, atomic), label modes, pairs
left to --cross_id, and bad inputs (clear message, exit 2, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mine_identities as mine
from faceid.tiny.identities import synthetic_identities


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def make_index(root: Path, n: int = 400, labelled: float = 0.0, seed: int = 2):
    """An index in get_face_info.py's layout over synthetic embeddings (no images: --hash none)."""
    s = synthetic_identities(n, seed=seed)
    (root / "emb").mkdir(parents=True, exist_ok=True)
    np.save(root / "emb" / "shard-00000.npy", s.x[: n // 2] * 20.0)  # raw embeddings are not unit length
    np.save(root / "emb" / "shard-00001.npy", s.x[n // 2 :] * 20.0)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        shard, row = (0, i) if i < n // 2 else (1, i - n // 2)
        obj = {"id": f"k{i:04d}", "image": f"imgs/{i}.png", "caption": "a person",
               "embedding": {"file": f"emb/shard-0000{shard}.npy", "row": row}}  # fmt: skip
        if rng.random() < labelled:
            obj["person_id"] = f"true{s.person[i]}"
        lines.append(json.dumps(obj))
    (root / "index.jsonl").write_text("\n".join(lines) + "\n")
    return root / "index.jsonl", s


def run(*argv) -> int:
    return mine.main(mine.parse_args(["--no_progress", "--hash", "none", *map(str, argv)]))


def test_mined_index_keys_pairs_and_rebased_paths(tmp_path, capsys):
    index, s = make_index(tmp_path / "d")
    out = tmp_path / "elsewhere" / "mined.jsonl"
    assert run("--index", index, "--output", out) == 0
    recs = _read(out)
    assert [r["id"] for r in recs] == [f"k{i:04d}" for i in range(400)]
    assert (
        recs[0]["image"] == "../d/imgs/0.png" and recs[0]["embedding"]["file"] == "../d/emb/shard-00000.npy"
    )
    pid = np.array([r["person_id"] for r in recs])
    from faceid.mine.clusters import purity

    pur, inv = purity(pid, s.person)
    print(f"purity {pur:.4f}, inverse purity {inv:.4f}")
    assert pur == 1.0 and inv >= 0.97
    key_row = {r["id"]: i for i, r in enumerate(recs)}
    for i, r in enumerate(recs):
        assert r["cluster_size"] == int((pid == r["person_id"]).sum())
        for k in r.get("reference", {}).get("ids", []):
            j = key_row[k]
            assert pid[j] == pid[i] and j != i and s.dup_of[i] != j and s.dup_of[j] != i
    report = json.loads((out.parent / "mined_report" / "report.json").read_text())
    assert (
        report["persons"] == len(set(pid)) and (out.parent / "mined_report" / "contact_sheet.png").is_file()
    )
    assert "photos/person" in (out.parent / "mined_report" / "histogram.txt").read_text()
    # pairs left to --cross_id: person ids only
    assert run("--index", index, "--output", tmp_path / "p.jsonl", "--pairs", "none") == 0
    assert not any("reference" in r for r in _read(tmp_path / "p.jsonl"))
    assert "Traceback" not in capsys.readouterr().err


def test_label_modes(tmp_path, capsys):
    index, s = make_index(tmp_path / "d", labelled=0.5)
    lines = _read(index)
    # a wrong label: one photo of another person carries person A's label
    a = next(i for i, r in enumerate(lines) if "person_id" in r)
    b = next(
        i for i, r in enumerate(lines) if s.person[i] != s.person[a] and (s.person == s.person[i]).sum() > 3
    )
    lines[b]["person_id"] = lines[a]["person_id"]
    index.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert run("--index", index, "--output", tmp_path / "check.jsonl", "--labels", "check") == 0
    printed = capsys.readouterr().out
    assert "label(s) split" in printed
    report = json.loads((tmp_path / "check_report" / "report.json").read_text())
    assert any(x["label"] == lines[a]["person_id"] for x in report["labels_split"])
    checked = _read(tmp_path / "check.jsonl")
    assert checked[a]["person_id_given"] == lines[a]["person_id"] and checked[a]["person_id"].startswith(
        "mined-"
    )
    assert run("--index", index, "--output", tmp_path / "keep.jsonl", "--labels", "keep") == 0
    kept = _read(tmp_path / "keep.jsonl")
    for r, src in zip(kept, lines):
        if "person_id" in src:
            assert r["person_id"] == src["person_id"]  # labels kept (must-link pulled b into a's person)
    assert kept[b]["person_id"] == kept[a]["person_id"]
    assert run("--index", index, "--output", tmp_path / "c.jsonl", "--labels", "constrain") == 0
    con = _read(tmp_path / "c.jsonl")
    assert con[b]["person_id"] == con[a]["person_id"] and con[a]["person_id"].startswith("mined-")


def test_bad_inputs_clear_messages(tmp_path, capsys):
    assert run("--index", tmp_path / "nope.jsonl", "--output", tmp_path / "o.jsonl") == 2
    assert "index not found" in capsys.readouterr().err
    index, _ = make_index(tmp_path / "d", n=40)
    (tmp_path / "d" / "emb" / "shard-00001.npy").unlink()
    assert run("--index", index, "--output", tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert (
        "20 line(s) cannot be mined" in err and "embedding file not found" in err and "shard-00001.npy" in err
    )
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()
    assert run("--index", index, "--output", tmp_path / "o.jsonl", "--skip_bad") == 0
    recs = _read(tmp_path / "o.jsonl")
    assert len(recs) == 40 and sum("cluster_size" in r for r in recs) == 20  # the rest copied unchanged
    (tmp_path / "d" / "emb" / "shard-00000.npy").write_bytes(b"not numpy")
    assert run("--index", index, "--output", tmp_path / "o2.jsonl") == 2
    assert "bad embedding file" in capsys.readouterr().err
    index.write_text('{"id": 1, "image": "a.png"}\n{broken\n')
    assert run("--index", index, "--output", tmp_path / "o3.jsonl") == 2
    err = capsys.readouterr().err
    assert "no embedding field" in err and "not JSON" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        mine.parse_args(["--index", "a", "--output", "b", "--threshold", "1.5"])


def test_perceptual_hash_of_face_crops_excludes_reposts(tmp_path):
    """Same picture under two lines (a re-post, re-encoded and scaled) but embeddings that differ: only the hash
    sees it."""
    from PIL import Image

    index, s = make_index(tmp_path / "d", n=200)
    recs = _read(index)
    big = np.bincount(s.person).argmax()
    rows = np.flatnonzero((s.person == big) & (s.dup_of < 0))[:4]
    (tmp_path / "d" / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for n, i in enumerate(rows):
        pic = Image.fromarray(rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)).resize(
            (160, 120), Image.BICUBIC
        )
        if n == 3:  # row 3 re-posts row 0's picture
            pic = Image.open(tmp_path / "d" / recs[rows[0]]["image"]).resize((320, 240))
        pic.save(tmp_path / "d" / recs[i]["image"], quality=80)
        recs[i]["bbox"] = [0, 0, pic.size[0], pic.size[1]]
    index.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "m.jsonl"
    assert (
        mine.main(
            mine.parse_args(
                ["--index", str(index), "--output", str(out), "--no_progress", "--max_refs", "99"]
            )
        )
        == 0
    )
    got = _read(out)
    a, b = recs[rows[0]]["id"], recs[rows[3]]["id"]
    assert b not in got[rows[0]]["reference"]["ids"] and a not in got[rows[3]]["reference"]["ids"]
    assert recs[rows[1]]["id"] in got[rows[0]]["reference"]["ids"]
    report = json.loads((tmp_path / "m_report" / "report.json").read_text())
    assert report["hash_errors"]  # the lines without pictures are reported, and still mined by cosine
    assert mine.main(mine.parse_args(["--index", str(index), "--output", str(out), "--no_progress", "--max_refs", "99",
                                      "--hash", "none"])) == 0  # fmt: skip
    assert b in _read(out)[rows[0]]["reference"]["ids"]


def test_two_ranks_share_the_knn(tmp_path, monkeypatch):
    from faceid.mine import clusters as C

    monkeypatch.setattr(C, "CHUNK_ROWS", 64)
    index, _ = make_index(tmp_path / "d", n=300)
    want = tmp_path / "one.jsonl"
    assert run("--index", index, "--output", want) == 0
    out = tmp_path / "two.jsonl"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run("--index", index, "--output", out) == 0
        assert out.exists() == (rank == 0)
    assert sorted((tmp_path / ".mining").glob("knn-w002-*.npz"))
    assert out.read_text() == want.read_text()


def test_prefer_pose_change_orders_references(tmp_path):
    from faceid.face.regions import ARCFACE_TEMPLATE
    from faceid.mine.pairs import head_pose

    index, _ = make_index(tmp_path / "d", n=200)
    recs = _read(index)
    for i, r in enumerate(recs):
        kps = ARCFACE_TEMPLATE.copy()
        kps[2, 0] += (i % 7 - 3) * 4.0  # the nose moves: the head turns
        r["kps"] = kps.tolist()
    index.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "m.jsonl"
    assert run("--index", index, "--output", out, "--prefer_pose_change", "--max_refs", "3") == 0
    yaw = {r["id"]: head_pose(r["kps"])[0] for r in recs}
    got = _read(out)
    checked = 0
    for r in got:
        refs = r.get("reference", {}).get("ids", [])
        if len(refs) < 3 or r["cluster_photos"] < 6:
            continue
        change = [abs(yaw[k] - yaw[r["id"]]) for k in refs]
        others = [
            abs(yaw[o["id"]] - yaw[r["id"]])
            for o in got
            if o["person_id"] == r["person_id"] and o["id"] != r["id"]
        ]
        assert change == sorted(change, reverse=True) and change[0] == pytest.approx(max(others), abs=0.01)
        checked += 1
    assert checked > 10
