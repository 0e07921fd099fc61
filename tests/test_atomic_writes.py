"""The one atomic-write rule (ip_adapter/utils.py ``atomic_path``): outputs get the mode the umask says, and a disk
that fills up ends in a message naming the file, with the partial write removed and what was there intact."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from faceid.files import DiskFullError, atomic_path, current_umask, write_json_atomic, write_text_atomic
from faceid.train.errors import run_cli


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    write_text_atomic(tmp_path / "a.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives: the reference
    assert mode(tmp_path / "a.txt") == mode(plain) == 0o666 & ~mask


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_names_file_keeps_previous_and_removes_partial(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(DiskFullError) as err:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            no_space()
    msg = str(err.value)
    assert (
        str(target) in msg and "no space left" in msg and "unchanged" in msg and "run the same command" in msg
    )
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left


def test_torch_short_write_is_disk_full(tmp_path):
    """torch.save reports a full disk as RuntimeError("... unexpected pos ...") (the issue's message)."""
    import torch

    def short_write(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2761536 vs 2761424")

    with pytest.raises(DiskFullError, match="no space left on the device while writing .*w.bin"):
        with atomic_path(tmp_path / "w.bin") as tmp:
            short_write({"a": torch.zeros(1)}, tmp)
    assert list(tmp_path.iterdir()) == []


def test_training_disk_full_at_checkpoint(tmp_path, tiny_dir, capsys, monkeypatch):
    """Disk full while writing checkpoint-2: exit 2 with one message (no traceback) naming the checkpoint, saying
    checkpoint-1 is intact and how to resume; no partial folder; checkpoint-1 still complete and loadable."""
    import torch
    from conftest_train import make_index_dataset, tiny_args

    import train_instantId_sdxl as t
    from faceid.train import checkpoints

    index = make_index_dataset(tmp_path / "data")
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **k):  # accelerate's optimizer/scheduler/RNG state of the second checkpoint
        if ".checkpoint-2.partial" in str(f):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 2761536 vs 2761424"
            )
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    argv = tiny_args(tiny_dir, out, "--data_json_file", str(index), "--max_train_steps", "3",
                     "--checkpointing_steps", "1")  # fmt: skip
    assert run_cli(t.main, t.parse_args, argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "no space left" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    line = lines[0]
    assert "checkpoint-2 was not written" in line and f"{out / 'checkpoint-1'} is intact" in line
    assert "--resume_from_checkpoint latest" in line
    assert [p.name for p in sorted(out.iterdir()) if "checkpoint" in p.name] == ["checkpoint-1"]
    assert checkpoints.read_state(out / "checkpoint-1")["global_step"] == 1
    from ip_adapter.weights import read_adapter

    image_proj, ip = read_adapter(out / "checkpoint-1" / "ip-adapter.safetensors")
    assert image_proj and ip


def test_apply_umask_opens_private_files_only(tmp_path, umask):
    """safetensors' save_file (hence save_pretrained) writes 0600 whatever the umask; apply_umask fixes those."""
    import torch
    from safetensors.torch import save_file

    from faceid.files import apply_umask

    umask(0o022)
    save_file({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    mine = tmp_path / "notes.txt"
    mine.write_text("x")
    os.chmod(mine, 0o640)
    apply_umask(tmp_path)
    assert mode(tmp_path / "w.safetensors") == 0o644 and mode(mine) == 0o640
