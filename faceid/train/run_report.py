"""A training run's ``train_log.jsonl`` as curves (PNG) and a short markdown summary (``report_run.py``).

Panels: the loss; Face Sim to the held-out persons' other photos (same) and to other persons (different); the
copy-paste score; the face-token spread and the loss gap of the collapse probe. A collapse warning is a red line.
What each curve means: docs/training.md, "Monitoring identity and collapse".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from faceid.files import atomic_path, write_text_atomic

LOG_NAME = "train_log.jsonl"


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of ``train_log.jsonl`` (a run folder or the file); a torn last line (a killed run) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (give a run's --output_dir or its {LOG_NAME})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that logged ``key``, by step (a resumed run's repeated steps: the last)."""
    by_step = {int(r["step"]): float(r[key]) for r in rows if key in r and r[key] is not None}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def summarize(rows: list[dict]) -> dict:
    """The figures the summary states (NaN-free: a missing curve is absent)."""
    out: dict = {}
    steps, loss = series(rows, "loss")
    if loss:
        tail = loss[-max(1, len(loss) // 10) :]
        out.update(steps=steps[-1], loss_first=loss[0], loss_last=sum(tail) / len(tail))
    for key in (
        "val_same",
        "val_different",
        "val_margin",
        "val_copy",
        "val_ref_sim",
        "val_clip_t",
        "val_face_found",
    ):
        s, v = series(rows, key)
        if v:
            out[key] = {"first": v[0], "last": v[-1], "best": max(v), "first_step": s[0], "last_step": s[-1]}
    s, spread = series(rows, "token_spread")
    if spread:
        out["token_spread"] = {"first": spread[0], "last": spread[-1], "min": min(spread)}
        out["spread_ratio_last"] = spread[-1] / spread[0] if spread[0] > 0 else math.nan
    s, gap = series(rows, "loss_gap")
    if gap:
        out["loss_gap"] = {"first": gap[0], "last": gap[-1], "max": max(gap)}
    warn = [int(r["step"]) for r in rows if r.get("collapse_warning")]
    out["collapse_warning_step"] = warn[0] if warn else None
    return out


def verdict(summary: dict) -> str:
    if summary.get("collapse_warning_step") is not None:
        return f"**collapse warned at step {summary['collapse_warning_step']}**: the model stopped using the face"
    same, diff = summary.get("val_same"), summary.get("val_different")
    if same and diff:
        margin = same["last"] - diff["last"]
        rise = same["last"] - same["first"]
        if margin > 0 and rise > 0:
            return (
                f"identity learned: same-person Face Sim rose {rise:+.3f}, {margin:+.3f} above other persons"
            )
        return f"identity not (yet) learned: rise {rise:+.3f}, margin {margin:+.3f}"
    return "no identity validation logged (turn on --validation_persons or --validation_index)"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(summary: dict, run: str, png_name: str) -> str:
    lines = [f"# Training run `{run}`", "", verdict(summary), "", f"![curves]({png_name})", ""]
    lines += ["| quantity | start | last | best / min |", "| --- | --- | --- | --- |"]
    if "loss_first" in summary:
        lines.append(
            f"| loss (last 10 % mean) | {_fmt(summary['loss_first'])} | {_fmt(summary['loss_last'])} | |"
        )
    names = {"val_same": "Face Sim, same person", "val_different": "Face Sim, different person",
             "val_margin": "margin (same − different)", "val_copy": "copy-paste (reference − same)",
             "val_ref_sim": "Face Sim to the reference", "val_clip_t": "CLIP-T",
             "val_face_found": "face found"}  # fmt: skip
    for key, name in names.items():
        if key in summary:
            v = summary[key]
            lines.append(f"| {name} (steps {v['first_step']}→{v['last_step']}) | {_fmt(v['first'])} | "
                         f"{_fmt(v['last'])} | {_fmt(v['best'])} |")  # fmt: skip
    if "token_spread" in summary:
        v = summary["token_spread"]
        lines.append(f"| face-token spread | {_fmt(v['first'])} | {_fmt(v['last'])} | {_fmt(v['min'])} |")
    if "loss_gap" in summary:
        v = summary["loss_gap"]
        lines.append(
            f"| loss gap (wrong − right face) | {_fmt(v['first'])} | {_fmt(v['last'])} | {_fmt(v['max'])} |"
        )
    lines += ["", f"{summary.get('steps', 0)} steps. What the curves mean: docs/training.md."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    s, v = series(rows, "loss")
    if v:
        ax[0].plot(s, v, color="0.75", lw=0.8, label="loss")
        ax[0].plot(s, smooth(v), color="C0", label="smoothed")
    ax[0].set_title("denoising loss")
    for key, lab, st in (("val_same", "same person", "o-"), ("val_different", "different person", "s--"),
                         ("val_margin", "margin", ":")):  # fmt: skip
        s, v = series(rows, key)
        if v:
            ax[1].plot(s, v, st, label=lab)
    ax[1].set_title("Face Sim (held-out validation)")
    for key, lab, st in (("val_copy", "copy-paste", "o-"), ("val_ref_sim", "Face Sim to reference", "--")):
        s, v = series(rows, key)
        if v:
            ax[2].plot(s, v, st, label=lab)
    if ax[2].lines:
        ax[2].axhline(0, color="0.6", lw=0.5)
    ax[2].set_title("copy-paste (reference − other photos)")
    s, v = series(rows, "token_spread")
    if v:
        ax[3].plot(s, v, "o-", color="C2", label="token spread")
    ax[3].set_title("collapse probe")
    ax[3].set_ylim(bottom=0)
    s, v = series(rows, "loss_gap")
    if v:
        twin = ax[3].twinx()
        twin.plot(s, v, "s--", color="C3", label="loss gap")
        twin.set_ylabel("loss gap (relative)", color="C3")
    warn = [int(r["step"]) for r in rows if r.get("collapse_warning")]
    hints = ("", "not logged: --validation_persons N\n(or --validation_index) + --validation_steps",
             "not logged: --validation_persons N\n(or --validation_index) + --validation_steps",
             "not logged: --collapse_check_steps N")  # fmt: skip
    last = max((int(r["step"]) for r in rows), default=1)
    for a, hint in zip(ax, hints):
        if not a.lines:
            a.text(0.5, 0.5, hint, ha="center", va="center", fontsize=8, color="0.4", transform=a.transAxes)
            a.set_xlim(0, max(last, 1))
        a.set_xlabel("step")
        for w in warn[:1]:
            a.axvline(w, color="red", lw=1)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def write_report(run: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, Path, dict]:
    """``report.png`` and ``report.md`` in ``out`` (default: the run folder); returns (png, md, summary)."""
    run = Path(run)
    rows = read_log(run)
    if not rows:
        raise FileNotFoundError(f"{run}: the training log is empty (has the run made a step?)")
    out = Path(out) if out else (run if run.is_dir() else run.parent)
    png, md = out / "report.png", out / "report.md"
    summary = summarize(rows)
    plot(rows, png, str(run))
    write_text_atomic(md, markdown(summary, str(run), png.name))
    return png, md, summary
