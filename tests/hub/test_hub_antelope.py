"""download_antelopev2 with hf_hub_download replaced (no network)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub

from faceid.hub.antelope import ANTELOPE_FILES, DEFAULT_REPO, download_antelopev2


def _fake(calls):
    def fake_download(repo_id, filename, *, subfolder=None, local_dir=None, endpoint=None, **kw):
        calls.append(
            {"repo_id": repo_id, "filename": filename, "subfolder": subfolder, "endpoint": endpoint, **kw}
        )
        path = Path(local_dir) / (f"{subfolder}/{filename}" if subfolder else filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx:" + filename.encode())
        return str(path)

    return fake_download


def test_download_layout_endpoint_and_skip(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake(calls))
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    out = download_antelopev2(tmp_path)
    assert out == tmp_path / "models" / "antelopev2"
    assert sorted(p.name for p in out.iterdir()) == sorted(ANTELOPE_FILES)
    assert {c["repo_id"] for c in calls} == {DEFAULT_REPO}
    assert {c["endpoint"] for c in calls} == {"https://mirror.example"}
    assert [c["filename"] for c in calls] == list(ANTELOPE_FILES)
    calls.clear()
    download_antelopev2(tmp_path)  # everything present: nothing fetched
    assert calls == []
    (out / "glintr100.onnx").unlink()
    download_antelopev2(tmp_path, endpoint="https://explicit.example", repo_id="me/mirror")
    assert [(c["filename"], c["endpoint"], c["repo_id"]) for c in calls] == [
        ("glintr100.onnx", "https://explicit.example", "me/mirror")
    ]


def test_download_from_subfolder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake(calls))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    out = download_antelopev2(tmp_path, subfolder="antelopev2", files=("glintr100.onnx",))
    assert (out / "glintr100.onnx").read_bytes() == b"onnx:glintr100.onnx"
    assert not (out / "antelopev2").exists() and calls[0]["endpoint"] is None
