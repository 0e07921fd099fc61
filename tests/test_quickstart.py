"""The README's offline quickstart, run as a user runs it: every real script in its own process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "quickstart.py", "--out", str(out), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "metrics table" in proc.stdout and str(out / "eval" / "summary.md") in proc.stdout

    index = [json.loads(line) for line in (out / "index" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 12 and {r["person_id"] for r in index} == {"person_0", "person_1", "person_2"}
    assert (out / "train" / "ip-adapter.bin").is_file() and (
        out / "train" / "ControlNetModel" / "config.json"
    ).is_file()
    settings = json.loads((out / "outputs" / "settings.json").read_text())
    assert len(settings["images"]) == 4
    assert all((out / "outputs" / r["path"]).is_file() for r in settings["images"])
    rows = list(csv.DictReader((out / "eval" / "per_image.csv").open()))
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert len(rows) == 4
    assert "Face Sim" in (out / "eval" / "summary.md").read_text()
    assert summary["images"] == 4 and summary["no_face"] + summary["face_sim"]["count"] == 4
    sims = [float(r["face_sim"]) for r in rows if r["face_sim"]]
    assert abs(summary["face_sim"]["mean"] - sum(sims) / len(sims)) < 1e-9
    assert all(-1.0 <= s <= 1.0 for s in sims)
