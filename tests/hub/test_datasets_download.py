"""Split-archive download and extraction: byte-identical to ``cat parts | tar x``, no concatenated copy on disk,
resumable, and path traversal refused."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from faceid.hub import client
from faceid.hub import datasets as dd


def _make_tree(root: Path, rng: np.random.Generator) -> None:
    (root / "laion_1024" / "imgs" / "sub").mkdir(parents=True)
    for i in range(12):
        size = int(rng.integers(1, 60_000))
        (root / "laion_1024" / "imgs" / f"{i:04d}.bin").write_bytes(rng.bytes(size))
    (root / "laion_1024" / "imgs" / "sub" / "empty.txt").write_bytes(b"")
    (root / "laion_1024" / "captions.jsonl").write_text('{"id": 1, "caption": "a face"}\n')
    os.symlink("captions.jsonl", root / "laion_1024" / "link.jsonl")


def _split(path: Path, part_size: int) -> list[Path]:
    data = path.read_bytes()
    parts = []
    for k, start in enumerate(range(0, len(data), part_size)):
        suffix = chr(ord("a") + k // 26) + chr(ord("a") + k % 26)
        part = path.with_name(path.name + "." + suffix)
        part.write_bytes(data[start : start + part_size])
        parts.append(part)
    return parts


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub repository: split laion_1024.tar.gz, plus a README; records every download."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    _make_tree(src, rng)
    store = tmp_path / "store"
    store.mkdir()
    archive = store / "laion_1024.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "laion_1024", arcname="laion_1024")
    parts = _split(archive, part_size=archive.stat().st_size // 5 + 1)
    assert len(parts) >= 5
    archive_size = archive.stat().st_size
    archive.unlink()  # only the parts are "on the Hub"
    (store / "README.md").write_text("# fake dataset\n")
    calls = []
    state = {"fail_on": None, "listing_endpoint": None}

    def fake_list(repo_id, repo_type=None, endpoint=None, revision=None, token=None):
        assert repo_type == "dataset"
        state["listing_endpoint"] = endpoint
        names = sorted(p.name for p in store.iterdir())
        # the Hub lists in arbitrary order: shuffle so the code has to sort the parts
        return list(np.random.default_rng(1).permutation(names))

    def fake_download(repo_id, filename, local_dir, endpoint=None, repo_type=None, revision=None, token=None):
        assert repo_type == "dataset"
        if state["fail_on"] == filename:
            state["fail_on"] = None
            raise ConnectionError(f"simulated network failure on {filename}")
        calls.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(store / filename, target)
        return str(target)

    monkeypatch.setattr(client, "list_files", fake_list)
    monkeypatch.setattr(client, "download_file", fake_download)
    return {
        "store": store,
        "parts": parts,
        "archive_size": archive_size,
        "calls": calls,
        "state": state,
        "tmp": tmp_path,
    }


def _reference_extract(parts: list[Path], dest: Path) -> None:
    dest.mkdir()
    cat = " ".join(f"'{p}'" for p in parts)
    subprocess.run(f"cat {cat} | tar xzf - -C '{dest}'", shell=True, check=True)


def test_archive_groups_orders_parts():
    names = ["b.tar.gz.ab", "b.tar.gz.aa", "README.md", "c.tar", "b.tar.gz.ba", "d.zip.010", "d.zip.009"]
    groups, other = dd.archive_groups(names)
    assert groups == {
        "b.tar.gz": ["b.tar.gz.aa", "b.tar.gz.ab", "b.tar.gz.ba"],
        "c.tar": ["c.tar"],
        "d.zip": ["d.zip.009", "d.zip.010"],
    }
    assert other == ["README.md"]


def test_split_archive_matches_cat_tar(hub, tmp_path, monkeypatch):
    parts = hub["parts"]
    ref = tmp_path / "ref"
    # the reference needs the parts on disk: copy them back temporarily
    _reference_extract([hub["store"] / p.name for p in parts], ref)

    out = tmp_path / "out"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    seen_sizes = []
    real_download = client.download_file

    def spying_download(*a, **k):
        # before each part arrives, record every file size under out/ (extracted data + downloaded parts)
        seen_sizes.extend(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
        return real_download(*a, **k)

    monkeypatch.setattr(client, "download_file", spying_download)
    dd.download_dataset("faceid6m", out, delete_parts=True)
    assert hub["state"]["listing_endpoint"] == "https://mirror.example"

    assert _snapshot(out / dd.DATA_DIR) == _snapshot(ref)
    # parts fetched lazily, in order, after the README
    assert hub["calls"] == ["README.md"] + [p.name for p in parts]
    # no file anywhere was ever the concatenated archive: the largest file written is at most one part
    seen_sizes.extend(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    assert max(seen_sizes) < hub["archive_size"]
    # with delete_parts every part is gone, README kept, marker written
    raw = out / dd.RAW_DIR
    assert sorted(p.name for p in raw.iterdir() if p.is_file()) == ["README.md"]
    assert (out / dd.MARKER_DIR / "laion_1024.tar.gz.done").exists()


def test_delete_parts_keeps_at_most_one_part_on_disk(hub, tmp_path, monkeypatch):
    out = tmp_path / "out"
    raw = out / dd.RAW_DIR
    max_parts = []
    real_download = client.download_file

    def spying_download(repo_id, filename, local_dir, **k):
        path = real_download(repo_id, filename, local_dir, **k)
        max_parts.append(sum(1 for p in raw.iterdir() if ".tar.gz." in p.name))
        return path

    monkeypatch.setattr(client, "download_file", spying_download)
    dd.download_dataset("faceid6m", out, delete_parts=True)
    assert max(max_parts) == 1


def test_keep_parts_and_resume_skips_done_archive(hub, tmp_path):
    out = tmp_path / "out"
    dd.download_dataset("crossfaceid", out, repo_id="me/mirror")
    raw = out / dd.RAW_DIR
    assert sorted(p.name for p in raw.iterdir() if p.is_file()) == sorted(
        p.name for p in hub["store"].iterdir()
    )
    before = _snapshot(out / dd.DATA_DIR)
    hub["calls"].clear()
    dd.download_dataset("crossfaceid", out, repo_id="me/mirror")
    assert hub["calls"] == ["README.md"]  # the archive's marker exists: no part fetched again
    assert _snapshot(out / dd.DATA_DIR) == before


def test_interrupted_extraction_resumes(hub, tmp_path):
    out = tmp_path / "out"
    hub["state"]["fail_on"] = hub["parts"][3].name
    with pytest.raises(ConnectionError):
        dd.download_dataset("faceid70k", out, delete_parts=True)
    assert not (out / dd.MARKER_DIR / "laion_1024.tar.gz.done").exists()
    assert any((out / dd.DATA_DIR).rglob("*.bin"))  # some members were extracted before the failure
    dd.download_dataset("faceid70k", out, delete_parts=True)
    ref = tmp_path / "ref"
    _reference_extract([hub["store"] / p.name for p in hub["parts"]], ref)
    assert _snapshot(out / dd.DATA_DIR) == _snapshot(ref)


def test_no_extract_only_downloads(hub, tmp_path):
    out = tmp_path / "out"
    dd.download_dataset("faceid6m", out, extract=False)
    assert not (out / dd.DATA_DIR).exists()
    assert len(list((out / dd.RAW_DIR).glob("laion_1024.tar.gz.*"))) == len(hub["parts"])


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    "bad",
    [
        _file("../escape.txt"),
        _file("ok/../../escape.txt"),
        _file("/tmp/abs_escape.txt"),
        _link("evil", "../../etc/passwd"),
        _link("evil", "/etc/passwd"),
        _link("hard", "../outside", kind=tarfile.LNKTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-rel", "symlink-abs", "hardlink"],
)
def test_path_traversal_refused(tmp_path, bad):
    data = _tar_bytes([_file("good.txt", b"fine"), bad])
    parts = []
    for k, start in enumerate(range(0, len(data), 64)):
        p = tmp_path / f"bad.tar.gz.a{chr(ord('a') + k)}"
        p.write_bytes(data[start : start + 64])
        parts.append(str(p))
    dest = tmp_path / "dest"
    with pytest.raises(dd.UnsafeArchiveError):
        dd.extract_archive("bad.tar.gz", parts, dest)
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/tmp/abs_escape.txt").exists()
    assert not (dest / "evil").exists() and not (dest / "hard").exists()
    assert not (dest / dd.MARKER_DIR / "bad.tar.gz.done").exists()


def test_chained_parts_reads_across_boundaries(tmp_path):
    blobs = [b"abc", b"", b"defgh", b"i"]
    paths = []
    for k, b in enumerate(blobs):
        p = tmp_path / f"p{k}"
        p.write_bytes(b)
        paths.append(str(p))
    done = []
    reader = dd.ChainedParts(paths, on_done=lambda n, p: done.append(n))
    assert io.BufferedReader(reader, buffer_size=2).read() == b"abcdefghi"
    assert done == paths


def test_build_index_hook_calls_get_face_info(hub, tmp_path, monkeypatch):
    import subprocess
    import sys

    import download

    seen = []

    def fake_run(cmd, *a, **k):  # the script a user would run, by this interpreter
        assert cmd[0] == sys.executable and cmd[1].endswith("get_face_info.py")
        seen.append(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "out"
    download.main(download.parse_args(["--dataset", "faceid6m", "--out", str(out), "--build_index"]))
    assert seen == [["--input", str(out / "data"), "--output", str(out / "index"), "--faceid6m_filters"]]
    assert dd.get_face_info_argv_for("faceid6m", out) == seen[0]


def test_hub_wrappers_call_huggingface_hub_correctly(monkeypatch):
    import inspect

    import huggingface_hub

    real_download, real_list = huggingface_hub.hf_hub_download, huggingface_hub.HfApi.list_repo_files
    seen = {}

    def rec_download(*a, **k):
        seen["download"] = inspect.signature(real_download).bind(*a, **k).arguments
        return "/x"

    def rec_list(self, *a, **k):
        seen["list"] = inspect.signature(real_list).bind(self, *a, **k).arguments
        seen["endpoint"] = self.endpoint
        return ["a.tar.gz.aa"]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", rec_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", rec_list)
    assert client.list_files("o/r", repo_type="dataset", endpoint="https://m.example") == ["a.tar.gz.aa"]
    assert seen["list"]["repo_type"] == "dataset" and seen["endpoint"] == "https://m.example"
    client.download_file("o/r", "a.tar.gz.aa", "/tmp/x", endpoint="https://m.example", repo_type="dataset")
    d = seen["download"]
    assert (d["repo_type"], d["local_dir"], d["endpoint"], d["filename"]) == (
        "dataset",
        "/tmp/x",
        "https://m.example",
        "a.tar.gz.aa",
    )
