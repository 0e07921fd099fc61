"""Evaluate generated images: inputs, the batched scoring loop, per-image CSV, summary JSON and markdown tables.

Inputs (see :func:`load_items`):

* the settings JSON that ``infer_from_pkl.py`` writes: ``{"images": [{"path": "out_000.png", "prompt": "...",
  "seed": 42, "face_image": "ref.jpg", "face_info": "ref.pkl" or null, ...}, ...], <top-level settings>}``.
  Relative paths are relative to the JSON file's folder; absolute paths are used as they are. A top-level
  ``face_image`` / ``prompt`` is the default for items without one;
* a CSV or JSONL with columns ``image, reference, prompt`` (optional ``seed``, ``baseline``, ``group``, ``id``),
  relative paths again relative to the file's folder;
* a folder holding one such file (``settings.json``, ``*.json`` with ``"images"``, ``*.jsonl`` or ``*.csv``).

Metrics per image:

* ``face_sim``: cosine of the ArcFace embeddings of the largest face in the output and in the reference
  (:class:`faceid.face.analysis.FaceAnalyzer`; use a recognizer other than the conditioning one for an unbiased
  number). Outputs without a detected face get no value and are counted apart (``no_face``); the summary also
  gives ``face_sim_all`` where they count as 0.
* ``clip_t``: ``100 * max(cos(image, prompt), 0)`` with CLIP (default ViT-L/14).
* ``clip_i``: ``100 * max(cos(image, reference image), 0)`` (the reference face image) and, when an item has a
  ``baseline`` (same seed and prompt generated without the face, as PuLID reports), ``clip_i_baseline``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from faceid.eval.metrics import (
    DEFAULT_CLIP_MODEL,
    ClipScorer,
    FaceEmbedder,
    clip_score,
    cosine,
    make_face_analyzer,
)
from faceid.face.images import load_image
from faceid.files import atomic_path, first_value, resolve_path, write_json_atomic, write_text_atomic

METRICS = ("face_sim", "clip_t", "clip_i", "clip_i_baseline")
CSV_COLUMNS = (
    "id",
    "image",
    "reference",
    "prompt",
    "seed",
    "group",
    "face_sim",
    "face_detected",
    "num_faces",
    "reference_face_detected",
    "clip_t",
    "clip_i",
    "clip_i_baseline",
    "baseline",
    "error",
)


# --------------------------------------------------------------------------------------------------- inputs


@dataclass
class EvalItem:
    image: str
    reference: str | None = None
    prompt: str | None = None
    seed: int | None = None
    baseline: str | None = None
    group: str | None = None
    id: str | None = None
    extra: dict = field(default_factory=dict)


_IMAGE_KEYS = ("path", "image", "output", "file")
_REF_KEYS = ("face_image", "reference", "ref", "reference_image")
_PROMPT_KEYS = ("prompt", "caption", "text")
_BASELINE_KEYS = ("baseline", "no_face_image", "baseline_image")
_GROUP_KEYS = ("group", "category")


def _item_from_dict(d: dict, base: Path, defaults: dict | None = None, index: int = 0) -> EvalItem:
    defaults = defaults or {}
    image = first_value(d, _IMAGE_KEYS)
    if image is None:
        raise ValueError(f"entry {index} has no image path (one of {_IMAGE_KEYS}): {d}")
    seed = first_value(d, ("seed",))
    known = set(_IMAGE_KEYS + _REF_KEYS + _PROMPT_KEYS + _BASELINE_KEYS + _GROUP_KEYS + ("seed", "id"))
    return EvalItem(
        image=resolve_path(base, image),
        reference=resolve_path(base, first_value(d, _REF_KEYS) or first_value(defaults, _REF_KEYS)),
        prompt=first_value(d, _PROMPT_KEYS) or first_value(defaults, _PROMPT_KEYS),
        seed=int(seed) if seed not in (None, "") else None,
        baseline=resolve_path(base, first_value(d, _BASELINE_KEYS)),
        group=first_value(d, _GROUP_KEYS),
        id=str(d["id"]) if d.get("id") not in (None, "") else Path(str(image)).stem,
        extra={k: v for k, v in d.items() if k not in known},
    )


def _find_input_file(folder: Path) -> Path:
    for name in ("settings.json", "results.json", "items.jsonl", "items.csv"):
        if (folder / name).is_file():
            return folder / name
    for p in sorted(folder.glob("*.json")):
        try:
            if isinstance(json.loads(p.read_text(encoding="utf-8")).get("images"), list):
                return p
        except (ValueError, AttributeError):
            continue
    found = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.csv"))
    if found:
        return found[0]
    raise FileNotFoundError(f"{folder}: no settings JSON, JSONL or CSV with images to evaluate")


def load_items(path: str | os.PathLike) -> list[EvalItem]:
    """Read the images to evaluate from a settings JSON, a JSONL, a CSV, or a folder holding one of them."""
    path = Path(path)
    if path.is_dir():
        path = _find_input_file(path)
    base = path.parent
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            entries, defaults = data, {}
        else:
            entries = data.get("images")
            if not isinstance(entries, list):
                raise ValueError(f"{path}: expected a JSON object with an 'images' list")
            defaults = {k: v for k, v in data.items() if k != "images" and not isinstance(v, (list, dict))}
        entries = [{"path": e} if isinstance(e, str) else e for e in entries]
        return [_item_from_dict(e, base, defaults, i) for i, e in enumerate(entries)]
    if suffix == ".jsonl":
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [_item_from_dict(json.loads(ln), base, None, i) for i, ln in enumerate(lines)]
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        return [_item_from_dict(r, base, None, i) for i, r in enumerate(rows)]
    raise ValueError(f"{path}: unsupported input (settings .json, .jsonl, .csv or a folder)")


# --------------------------------------------------------------------------------------------------- evaluation


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img")


def evaluate_items(
    items: Sequence[EvalItem],
    clip: ClipScorer | None = None,
    face: FaceEmbedder | None = None,
    batch_size: int = 8,
    baseline: bool = True,
    progress: bool = True,
    desc: str = "evaluate",
) -> list[dict]:
    """Score every item; returns one row per item (keys :data:`CSV_COLUMNS`, missing metrics are ``None``)."""
    rows = []
    ref_clip_cache: dict[str, np.ndarray] = {}
    text_cache: dict[str, np.ndarray] = {}
    bar = _progress(len(items), progress, desc)
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        images: list[Image.Image | None] = []
        batch_rows = []
        for it in batch:
            row = {k: None for k in CSV_COLUMNS}
            row.update(
                id=it.id,
                image=it.image,
                reference=it.reference,
                prompt=it.prompt,
                seed=it.seed,
                group=it.group,
                baseline=it.baseline,
            )
            try:
                images.append(load_image(it.image))
            except (OSError, ValueError) as exc:
                images.append(None)
                row["error"] = str(exc)
            batch_rows.append(row)
        ok = [i for i, im in enumerate(images) if im is not None]

        if face is not None and ok:
            for i, (emb, n) in zip(ok, face.embed_many([images[i] for i in ok])):
                it, row = batch[i], batch_rows[i]
                row["face_detected"] = emb is not None
                row["num_faces"] = n
                if it.reference:
                    try:
                        ref_emb, _ = face.embed(load_image(it.reference), key=it.reference)
                    except (OSError, ValueError) as exc:
                        row["error"] = f"reference: {exc}"
                        continue
                    row["reference_face_detected"] = ref_emb is not None
                    if emb is not None and ref_emb is not None:
                        row["face_sim"] = cosine(emb, ref_emb)

        if clip is not None and ok:
            img_emb = clip.image_embeds([images[i] for i in ok])
            prompts = sorted(
                {batch[i].prompt for i in ok if batch[i].prompt and batch[i].prompt not in text_cache}
            )
            if prompts:
                for p, e in zip(prompts, clip.text_embeds(prompts)):
                    text_cache[p] = e
            refs = {batch[i].reference for i in ok if batch[i].reference}
            refs |= {batch[i].baseline for i in ok if baseline and batch[i].baseline}
            refs = sorted(r for r in refs if r not in ref_clip_cache)
            loaded = []
            for r in refs:
                try:
                    loaded.append((r, load_image(r)))
                except (OSError, ValueError):
                    pass
            if loaded:
                for (r, _), e in zip(loaded, clip.image_embeds([im for _, im in loaded])):
                    ref_clip_cache[r] = e
            for e, i in zip(img_emb, ok):
                it, row = batch[i], batch_rows[i]
                if it.prompt:
                    row["clip_t"] = clip_score(e, text_cache[it.prompt])
                if it.reference in ref_clip_cache:
                    row["clip_i"] = clip_score(e, ref_clip_cache[it.reference])
                elif it.reference and not row["error"]:
                    row["error"] = f"reference unreadable: {it.reference}"
                if baseline and it.baseline in ref_clip_cache:
                    row["clip_i_baseline"] = clip_score(e, ref_clip_cache[it.baseline])
        rows.extend(batch_rows)
        bar.update(len(batch))
    bar.close()
    return rows


def _stats(values: Iterable[float | None]) -> dict:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "count": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "count": int(v.size)}


def summarize(rows: Sequence[dict]) -> dict:
    """Mean, std (population, ddof=0) and count of each metric, plus the no-face counts.

    ``face_sim`` averages outputs with a detected face; ``face_sim_all`` counts outputs without one as 0.
    ``no_face`` = readable outputs with no detected face (only when Face Sim ran); ``no_face_rate`` = that over
    the readable outputs. ``reference_no_face`` counts rows whose reference has no face (Face Sim undefined).
    """
    summary: dict = {"images": len(rows), "errors": sum(1 for r in rows if r.get("error"))}
    for m in METRICS:
        summary[m] = _stats(r.get(m) for r in rows)
    face_ran = [r for r in rows if r.get("face_detected") is not None]  # readable outputs Face Sim looked at
    if face_ran:
        no_face = sum(1 for r in face_ran if not r["face_detected"])
        summary["no_face"] = no_face
        summary["no_face_rate"] = no_face / len(face_ran)
        summary["reference_no_face"] = sum(1 for r in face_ran if r.get("reference_face_detected") is False)
        scored = [r for r in face_ran if r.get("reference_face_detected")]
        summary["face_sim_all"] = _stats(
            (r["face_sim"] if r.get("face_sim") is not None else 0.0) for r in scored
        )
    groups = sorted({r["group"] for r in rows if r.get("group")})
    if groups:
        summary["groups"] = {
            g: {m: _stats(r.get(m) for r in rows if r.get("group") == g) for m in METRICS} for g in groups
        }
    return summary


# --------------------------------------------------------------------------------------------------- output


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] = CSV_COLUMNS) -> None:
    """One row per image (floats written with repr: read back exactly), written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(
                    {
                        k: ("" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else r[k]))
                        for k in columns
                    }
                )


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cell(stat: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_table(summaries: dict[str, dict]) -> str:
    """One row per result set: Face Sim, Face Sim (no face = 0), no-face, CLIP-T, CLIP-I[, CLIP-I vs baseline]."""
    has_base = any((s.get("clip_i_baseline") or {}).get("count") for s in summaries.values())
    head = ["set", "images", "Face Sim", "Face Sim (no face = 0)", "no face", "CLIP-T", "CLIP-I (ref)"]
    if has_base:
        head.append("CLIP-I (no-face baseline)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for name, s in summaries.items():
        no_face = "–" if "no_face" not in s else f"{s['no_face']} ({100 * s['no_face_rate']:.1f}%)"
        cells = [
            name,
            str(s.get("images", "")),
            _cell(s.get("face_sim"), digits=4),
            _cell(s.get("face_sim_all"), digits=4),
            no_face,
            _cell(s.get("clip_t")),
            _cell(s.get("clip_i")),
        ]
        if has_base:
            cells.append(_cell(s.get("clip_i_baseline")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Face Sim: ArcFace cosine, output vs reference (outputs with a face). CLIP-T: 100·max(cos(image, prompt), 0). "
        "CLIP-I: 100·max(cos(image, reference face image), 0); baseline: vs the same seed generated without the face. "
        "Values are mean ± std (ddof=0)."
    )
    return "\n".join(lines) + "\n"


def write_results(
    rows: Sequence[dict], out_dir: str | os.PathLike, name: str = "results", meta: dict | None = None
) -> dict:
    """Write ``per_image.csv``, ``summary.json`` and ``summary.md`` into ``out_dir``; returns the summary."""
    out = Path(out_dir)
    summary = summarize(rows)
    summary["name"] = name
    if meta:
        summary["settings"] = meta
    write_csv(rows, out / "per_image.csv")
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", markdown_table({name: summary}))
    return summary


def load_summary(path: str | os.PathLike) -> dict:
    """Read a ``summary.json`` (or a result folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    return json.loads(p.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------- runs


def build_scorers(
    clip_model: str | None = DEFAULT_CLIP_MODEL,
    face_root: str | None = None,
    face_model_name: str | None = None,
    det_size: int = 640,
    device: str = "cpu",
    batch_size: int = 8,
    providers=None,
) -> tuple[ClipScorer | None, FaceEmbedder | None]:
    """CLIP scorer (None when ``clip_model`` is falsy) and face embedder (None when ``face_root`` is falsy)."""
    clip = ClipScorer(clip_model, device=device, batch_size=batch_size) if clip_model else None
    face = None
    if face_root:
        face = FaceEmbedder(
            make_face_analyzer(face_root, face_model_name, det_size=det_size, providers=providers)
        )
    return clip, face


def evaluate_sets(
    inputs: dict[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    clip: ClipScorer | None,
    face: FaceEmbedder | None,
    batch_size: int = 8,
    baseline: bool = False,
    limit: int | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> dict[str, dict]:
    """Evaluate each named input into ``out_dir/<name>/``; with several, also write ``out_dir/compare.md``."""
    out = Path(out_dir)
    summaries = {}
    for name, path in inputs.items():
        items = load_items(path)[:limit] if limit else load_items(path)
        rows = evaluate_items(
            items, clip, face, batch_size=batch_size, baseline=baseline, progress=progress, desc=name
        )
        settings = dict(meta or {}, input=os.fspath(path))
        summaries[name] = write_results(
            rows, out / name if len(inputs) > 1 else out, name=name, meta=settings
        )
    if len(summaries) > 1:
        write_text_atomic(out / "compare.md", markdown_table(summaries))
    return summaries


def compare_results(results: dict[str, str | os.PathLike], out_path: str | os.PathLike | None = None) -> str:
    """One markdown table from existing result folders / ``summary.json`` files; written to ``out_path`` if given."""
    table = markdown_table({name: load_summary(p) for name, p in results.items()})
    if out_path:
        write_text_atomic(out_path, table)
    return table
