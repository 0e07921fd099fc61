"""Every script ends the same way: a user's mistake prints its message and exits 2, without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["get_face_info.py", "--input", "{tmp}", "--output", "{tmp}/out", "--root", "{tmp}/none"],
         "no face-analysis models in"),
        (["evaluate.py", "{tmp}/missing/settings.json", "--out", "{tmp}/ev"], "not found: "),
        (["infer_from_pkl.py", "--face_adapter", "{tmp}/nope.bin"], "face adapter not found"),
        (["evaluate.py", "--protocol", "{tmp}/protocol.json", "--checkpoint", "a={tmp}", "--out", "{tmp}/ev"],
         "faces folder not found: "),  # raised by faceid/eval/grid.py as InputError
    ],
)  # fmt: skip
def test_user_errors_exit_2_without_traceback(tmp_path, argv, expected):
    (tmp_path / "a.png").write_bytes(b"")  # something to index
    (tmp_path / "protocol.json").write_text('{"faces_dir": "no_faces", "prompts": ["a photo"]}')
    proc = _run(*[a.format(tmp=tmp_path) for a in argv])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr


def test_run_keeps_tracebacks_for_bugs_and_passes_int_codes():
    from faceid import cli

    with pytest.raises(SystemExit) as done:
        cli.run(lambda args: 3, lambda argv: None)
    assert done.value.code == 3
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda args: 1 / 0, lambda argv: None)
