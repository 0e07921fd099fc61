"""What mining found, in a form people can look at: a cluster-size histogram, counts, and a contact sheet PNG (a row
of face crops per mined person)."""

from __future__ import annotations

import os

import numpy as np

from faceid.files import atomic_path

BUCKETS = ((1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 1000), (1001, None))


def size_histogram(sizes: np.ndarray) -> list[dict]:
    """Clusters and photos per size bucket (``{"sizes": "3-5", "clusters": n, "photos": m}``)."""
    out = []
    for lo, hi in BUCKETS:
        sel = (sizes >= lo) & (sizes <= (hi if hi is not None else np.iinfo(np.int64).max))
        label = str(lo) if hi == lo else f"{lo}+" if hi is None else f"{lo}-{hi}"
        out.append({"sizes": label, "clusters": int(sel.sum()), "photos": int(sizes[sel].sum())})
    return out


def format_histogram(hist: list[dict]) -> str:
    total = max(1, sum(h["clusters"] for h in hist))
    lines = [f"{'photos/person':>14} {'persons':>10} {'photos':>10}"]
    for h in hist:
        bar = "#" * int(round(40 * h["clusters"] / total))
        lines.append(f"{h['sizes']:>14} {h['clusters']:>10} {h['photos']:>10}  {bar}")
    return "\n".join(lines)


def contact_sheet(
    rows: list[tuple[str, list[tuple[str, list | None]]]],
    path: str | os.PathLike,
    thumb: int = 96,
    per_row: int = 8,
) -> str:
    """Write a PNG: one row per person (``(title, [(image path, bbox or None), ...])``), face crops ``thumb``
    pixels square, the title on the left. Unreadable images become grey tiles."""
    from PIL import Image, ImageDraw

    from faceid.face.images import load_image
    from faceid.mine.pairs import face_crop

    label_w = 170
    sheet = Image.new(
        "RGB", (label_w + per_row * (thumb + 4) + 4, max(1, len(rows)) * (thumb + 4) + 4), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for r, (title, faces) in enumerate(rows):
        y = 4 + r * (thumb + 4)
        for line, text in enumerate(title.split("\n")[:4]):
            draw.text((4, y + 4 + 14 * line), text[:26], fill=(0, 0, 0))
        for c, (image, bbox) in enumerate(faces[:per_row]):
            try:
                tile = face_crop(load_image(image), bbox, margin=0.1).resize((thumb, thumb))
            except Exception:  # noqa: BLE001 - a missing photo must not stop the report
                tile = Image.new("RGB", (thumb, thumb), (160, 160, 160))
            sheet.paste(tile, (label_w + 4 + c * (thumb + 4), y))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return str(path)
