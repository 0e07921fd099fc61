"""The learnable miniature world: synthetic persons, their photos and captions, how its face detector, recognizer
and VAE see them, and the measurements of a built world. ``faceid/tiny/pretrain.py`` pretrains the tiny VAE, SDXL
UNet (+ text encoders) and face recognizer on it.

A *person* is a stable identity code: four bright "skin" colours, one per quadrant of the face rectangle. A
*photo* of a person varies what real photos vary between shots of one person, and names it in the caption:

* adornment: ``wearing glasses`` (a cyan band at eye height) or ``no glasses``;
* expression: ``smiling`` (a wide pink mouth band) or ``serious`` (a narrow one);
* pose: position, size and aspect of the face box (the 5 keypoints follow it: they drive IdentityNet);
* scene: ``red`` / ``green`` / ``blue`` background with noise.

Everything inside the face stays bright (channel mean above the tiny detector's level) and everything outside
dark, so the tiny antelopev2 detector finds exactly one face with keypoints at the template positions in its box.

    WORLD_THREADS=2 nice python -m faceid.tiny.world --out faceid/tiny/weights   # ~14 min on 2 idle CPU cores

writes ``vae/unet/recognizer.safetensors`` (fp16) and ``world.json`` (scaling factor,
measured figures). ``faceid.tiny.models.build_tiny`` assembles the usual layout from them (no training at build
time). Deterministic for a given torch version and thread count (seeds fixed; CPU kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceid.face.regions import ARCFACE_TEMPLATE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IMAGE_SIZE = 64
NUM_PERSONS = 96
WORLD_SEED = 1234
BACKGROUNDS = {"red": (90, 22, 22), "green": (22, 80, 28), "blue": (24, 32, 96)}
GLASSES_RGB = (120, 245, 255)
MOUTH_RGB = (255, 110, 175)
# Identity colours per channel (kept bright; disjoint from the glasses' low red and the mouth's low green).
SKIN_LOW = np.array([195, 150, 115])
SKIN_HIGH = np.array([255, 225, 195])


# The attribute classifier's thresholds (on colour differences, 0..255), set on VAE reconstructions of photos.
GLASSES_THRESHOLD = 12.0
SMILE_THRESHOLD = 16.0
# Recognizer: 112 -> 56 -> 28 -> 14 -> 7 -> 4 (stride-2 3x3 convs + ReLU), flatten, Gemm -> 512.
REC_CHANNELS = (16, 32, 48, 64, 32)
# What the recognizer's normalised embedding leaks of a photo, as ArcFace's leaks expression, glasses or pose:
# its component along a fixed unit direction per attribute is trained to +LEAK (attribute present) or -LEAK.
# Two photos of one person that differ in one attribute lose ~2*LEAK^2 of cosine (0.18): persons stay apart,
# and what the embedding carries of the photo can be copied (CrossFaceID's copy-paste).
LEAKED_ATTRIBUTES = ("glasses", "smiling")
LEAK = 0.3


# ---------------------------------------------------------------------------------------------------------------
# Persons, photos, captions


def person_codes(n: int = NUM_PERSONS, seed: int = WORLD_SEED) -> np.ndarray:
    """``[n, 4, 3]`` quadrant colours (uint8-valued floats), the identities of the world's persons."""
    rng = np.random.default_rng(seed)
    return rng.uniform(SKIN_LOW, SKIN_HIGH, size=(n, 4, 3)).round()


@dataclass
class Photo:
    person: int
    glasses: bool
    smiling: bool
    background: str
    box: tuple[int, int, int, int]

    @property
    def caption(self) -> str:
        return caption_for(self.glasses, self.smiling, self.background)


def caption_for(glasses: bool, smiling: bool, background: str) -> str:
    g = "wearing glasses" if glasses else "no glasses"
    s = "smiling" if smiling else "serious"
    return f"a photo of a person, {g}, {s}, {background} background"


def box_kps(box) -> np.ndarray:
    """The 5 keypoints the tiny detector reports for a face box: the ArcFace template scaled into it."""
    x1, y1, x2, y2 = box
    return (
        ARCFACE_TEMPLATE / 112.0 * np.array([x2 - x1, y2 - y1], np.float32) + np.array([x1, y1], np.float32)
    ).astype(np.float32)


def random_photo(rng: np.random.Generator, person: int, size: int = IMAGE_SIZE, attrs=None) -> Photo:
    side = rng.uniform(0.36, 0.54) * size
    aspect = rng.uniform(0.85, 1.15)
    w, h = int(round(side * math.sqrt(aspect))), int(round(side / math.sqrt(aspect)))
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.12, 0.12) * size
    x1 = int(np.clip(round(cx - w / 2), 2, size - w - 2))
    y1 = int(np.clip(round(cy - h / 2), 2, size - h - 2))
    glasses, smiling, bg = (
        bool(rng.random() < 0.5),
        bool(rng.random() < 0.5),
        str(rng.choice(list(BACKGROUNDS))),
    )
    if attrs:
        glasses = attrs.get("glasses", glasses)
        smiling = attrs.get("smiling", smiling)
        bg = attrs.get("background", bg)
    return Photo(person, glasses, smiling, bg, (x1, y1, x1 + w, y1 + h))


def draw_person(
    img: np.ndarray, box, code: np.ndarray, glasses: bool = False, smiling: bool = False
) -> np.ndarray:
    """Paint a person's face (quadrant colours ``code`` [4, 3]) with its attributes into ``img`` in place."""
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    xm, ym = x1 + w // 2, y1 + h // 2
    for q, (ys, xs) in enumerate(
        ((slice(y1, ym), slice(x1, xm)), (slice(y1, ym), slice(xm, x2)), (slice(ym, y2), slice(x1, xm)),
         (slice(ym, y2), slice(xm, x2)))
    ):  # fmt: skip
        img[ys, xs] = code[q]
    if glasses:
        gy1, gy2 = y1 + int(round(0.36 * h)), y1 + int(round(0.56 * h))
        img[gy1:gy2, x1 + int(round(0.1 * w)) : x2 - int(round(0.1 * w))] = GLASSES_RGB
    my1 = y1 + int(round(0.74 * h))
    if smiling:
        my2, mx1, mx2 = y1 + int(round(0.90 * h)), x1 + int(round(0.18 * w)), x2 - int(round(0.18 * w))
    else:
        my2, mx1, mx2 = y1 + int(round(0.82 * h)), x1 + int(round(0.40 * w)), x2 - int(round(0.40 * w))
    img[my1 : max(my2, my1 + 1), mx1 : max(mx2, mx1 + 1)] = MOUTH_RGB
    return img


def render(photo: Photo, codes: np.ndarray, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """RGB uint8 ``[size, size, 3]`` of ``photo``; background noise from ``seed``."""
    rng = np.random.default_rng(seed)
    base = np.array(BACKGROUNDS[photo.background], np.float32)
    img = base + rng.uniform(-10, 10, size=(size, size, 3))
    img = np.clip(img, 0, 255)
    draw_person(img, photo.box, codes[photo.person], photo.glasses, photo.smiling)
    return img.round().astype(np.uint8)


def sample_photos(n: int, persons, seed: int, size: int = IMAGE_SIZE):
    """``n`` photos of persons drawn from ``persons`` (a list of ids): (images [n,H,W,3] uint8, photos)."""
    rng = np.random.default_rng(seed)
    codes = person_codes()
    photos = [random_photo(rng, int(rng.choice(persons)), size) for _ in range(n)]
    imgs = np.stack([render(p, codes, size, seed=int(rng.integers(1 << 31))) for p in photos])
    return imgs, photos


# ---------------------------------------------------------------------------------------------------------------
# Reading images of the world: face box, attributes, aligned crops


def bright_mask(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32).mean(axis=2) > 140.0


def find_face_box(img: np.ndarray):
    """Bounding box of the bright pixels (the face), or None. Tolerant of blur (rows/columns with a few)."""
    m = bright_mask(img)
    rows, cols = np.where(m.sum(1) >= 3)[0], np.where(m.sum(0) >= 3)[0]
    if len(rows) < 4 or len(cols) < 4:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def classify_attributes(img: np.ndarray, box=None) -> dict:
    """The world's attribute classifier (rules on colours): glasses, smiling, background, and the face box."""
    img = img.astype(np.float32)
    box = box if box is not None else find_face_box(img)
    dark = ~bright_mask(img)
    bg_mean = img[dark].mean(0) if dark.any() else np.zeros(3)
    refs = np.array(list(BACKGROUNDS.values()), np.float32)
    background = list(BACKGROUNDS)[int(np.argmin(((refs - bg_mean) ** 2).sum(1)))]
    if box is None:
        return {"face": False, "glasses": None, "smiling": None, "background": background, "box": None}
    x1, y1, x2, y2 = box
    h = max(y2 - y1, 1)
    f = img[y1:y2, x1:x2]
    cyan, pink = f[..., 2] - f[..., 0], f[..., 0] - f[..., 1]
    # Relative to the face's own colours (the identity varies them); robust to the VAE's 8x8-cell blur.
    glasses = float(cyan[int(0.30 * h) : int(0.62 * h)].mean() - np.median(cyan))
    mouth = float(pink[int(0.66 * h) :].mean() - np.median(pink))
    return {
        "face": True,
        "glasses": glasses > GLASSES_THRESHOLD,
        "smiling": mouth > SMILE_THRESHOLD,
        "background": background,
        "box": box,
        "glasses_score": glasses,
        "mouth_score": mouth,
    }


def aligned_crop(img: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """insightface's ``norm_crop`` (112x112) of an RGB image, kept RGB."""
    from insightface.utils.face_align import norm_crop

    return norm_crop(np.ascontiguousarray(img), np.asarray(kps, np.float32), 112)


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (Umeyama, as skimage's SimilarityTransform) mapping ``src`` onto ``dst``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    r = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    t = md - scale * r @ ms
    return np.hstack([scale * r, t[:, None]])


def fast_crop(img: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """:func:`aligned_crop` without skimage (same transform; used for the recognizer's training data)."""
    import cv2

    m = similarity_matrix(kps, ARCFACE_TEMPLATE)
    return cv2.warpAffine(np.ascontiguousarray(img), m, (112, 112), borderValue=0.0)


def crops_to_input(crops: np.ndarray) -> np.ndarray:
    """[N,112,112,3] RGB uint8 -> the recognizer's input (what insightface's blobFromImages gives it)."""
    return ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


# ---------------------------------------------------------------------------------------------------------------
# How the recognizer and the VAE see the world


def decoded_like(img: np.ndarray, rng=None, cell_noise: float = 0.0) -> np.ndarray:
    """What the world's VAE gives back for ``img`` (float RGB [H,W,3]): the 8x8-cell colour means painted back
    (the constructed VAE's round trip, within 1 grey level), with optional per-cell colour noise of std
    ``cell_noise`` (the errors of a generated latent)."""
    h, w, _ = img.shape
    cells = img.reshape(h // 8, 8, w // 8, 8, 3).mean((1, 3))
    if rng is not None and cell_noise > 0:
        cells = cells + rng.normal(0, cell_noise, cells.shape)
    return cells.repeat(8, 0).repeat(8, 1)


def recognizer_stats(embed, n_persons: int = 24, per: int = 4, seed: int = 5, decoded: bool = False) -> dict:
    """Same-person and different-person cosine of ``embed`` (crops [N,3,112,112] -> [N,512]) on fresh photos
    (``decoded``: on their VAE round trips, aligned on the face box found there, as Face Sim reads generations)."""
    rng = np.random.default_rng(seed)
    codes = person_codes()
    persons = rng.choice(NUM_PERSONS, n_persons, replace=False)
    xs, ys = [], []
    for p in persons:
        for _ in range(per):
            photo = random_photo(rng, int(p))
            img, box = render(photo, codes, seed=int(rng.integers(1 << 31))), photo.box
            if decoded:
                img = decoded_like(img.astype(np.float32)).round().astype(np.uint8)
                box = find_face_box(img) or box
            xs.append(aligned_crop(img, box_kps(box)))
            ys.append(int(p))
    e = embed(crops_to_input(np.stack(xs)))
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    ys = np.array(ys)
    same = (ys[:, None] == ys[None]) & ~np.eye(len(ys), dtype=bool)
    diff = ys[:, None] != ys[None]
    return {
        "same_mean": float(sim[same].mean()),
        "same_min": float(sim[same].min()),
        "diff_mean": float(sim[diff].mean()),
        "diff_std": float(sim[diff].std()),
        "diff_max": float(sim[diff].max()),
    }


def leak_directions(dim: int = 512) -> np.ndarray:
    """``[len(LEAKED_ATTRIBUTES), dim]`` orthonormal directions along which the recognizer leaks attributes."""
    q, _ = np.linalg.qr(np.random.default_rng(WORLD_SEED + 7).standard_normal((dim, len(LEAKED_ATTRIBUTES))))
    return q.T.astype(np.float32)


def _probe_photos(persons, n: int, seed: int, decoded: bool):
    rng = np.random.default_rng(seed)
    codes = person_codes()
    crops, labels = [], []
    for _ in range(n):
        photo = random_photo(rng, int(rng.choice(persons)))
        img, box = render(photo, codes, seed=int(rng.integers(1 << 31))), photo.box
        if decoded:
            img = decoded_like(img.astype(np.float32)).round().astype(np.uint8)
            box = find_face_box(img) or box
        crops.append(aligned_crop(img, box_kps(box)))
        labels.append([getattr(photo, a) for a in LEAKED_ATTRIBUTES])
    return crops_to_input(np.stack(crops)), np.array(labels, bool)


def attribute_probe(embed, n: int = 384, seed: int = 9, decoded: bool = False, ridge: float = 1e-2) -> dict:
    """Accuracy of a linear probe reading each of LEAKED_ATTRIBUTES from ``embed``'s normalised embedding:
    ridge least squares on ±1 labels, fitted on ``n`` fresh photos of persons 0-47 and tested on ``n`` fresh
    photos of persons 48-95 (held-out persons; ``decoded``: their VAE round trips). Chance: ~0.5."""

    def feats(x):
        e = embed(x)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return np.hstack([e, np.ones((len(e), 1), e.dtype)])

    half = NUM_PERSONS // 2
    xtr, ytr = _probe_photos(range(half), n, seed, decoded)
    xte, yte = _probe_photos(range(half, NUM_PERSONS), n, seed + 1, decoded)
    ftr, fte = feats(xtr), feats(xte)
    a = ftr.T @ ftr + ridge * np.eye(ftr.shape[1])
    w = np.linalg.solve(a, ftr.T @ (2.0 * ytr - 1.0))
    acc = ((fte @ w) > 0) == yte
    return {attr: float(acc[:, i].mean()) for i, attr in enumerate(LEAKED_ATTRIBUTES)}


def measure_recognizer(embed) -> dict:
    """The recognizer's figures (``python -m faceid.tiny.world --measure``): identity separation on crisp photos
    and VAE round trips, and the attribute probe's held-out accuracy on both."""
    return {
        "identity": recognizer_stats(embed),
        "identity_on_decoded": recognizer_stats(embed, decoded=True),
        "attribute_probe": attribute_probe(embed),
        "attribute_probe_on_decoded": attribute_probe(embed, decoded=True),
    }


def to_pixels(imgs: np.ndarray):
    import torch

    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Measurements of a built world


def latent_std(vae, scaling: float, n: int = 64, seed: int = 777) -> float:
    import torch

    imgs, _ = sample_photos(n, list(range(NUM_PERSONS)), seed=seed)
    with torch.no_grad():
        return float((vae.encode(to_pixels(imgs)).latent_dist.mean * scaling).std())


def vae_reconstruction(vae, n: int = 32, seed: int = 778) -> dict:
    import torch

    imgs, photos = sample_photos(n, list(range(NUM_PERSONS)), seed=seed)
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_pixels(imgs)).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    mae = float(np.abs(rec.astype(np.float32) - imgs).mean())
    ok = [attrs_match(classify_attributes(r), p) for r, p in zip(rec, photos)]
    return {"mae_uint8": mae, "attributes_kept": float(np.mean(ok))}


def attrs_match(pred: dict, photo: Photo) -> bool:
    return bool(
        pred["face"]
        and pred["glasses"] == photo.glasses
        and pred["smiling"] == photo.smiling
        and pred["background"] == photo.background
    )


def generate_base(pipe, captions, seed: int = 0, steps: int = 20, guidance: float = 5.0):
    """Images from the plain tiny SDXL pipeline (no face) for ``captions``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = pipe(list(captions), num_inference_steps=steps, guidance_scale=guidance, generator=g,
               height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np").images  # fmt: skip
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def base_model_following(pipe, n: int = 24, seed: int = 0) -> dict:
    """Caption following of the base model: share of generated images whose classified attributes match."""
    rng = np.random.default_rng(seed)
    photos = [random_photo(rng, 0) for _ in range(n)]
    imgs = generate_base(pipe, [p.caption for p in photos], seed=seed)
    preds = [classify_attributes(im) for im in imgs]
    return {
        "face_found": float(np.mean([p["face"] for p in preds])),
        "glasses": float(np.mean([p["glasses"] == ph.glasses for p, ph in zip(preds, photos)])),
        "smiling": float(np.mean([p["smiling"] == ph.smiling for p, ph in zip(preds, photos)])),
        "background": float(np.mean([p["background"] == ph.background for p, ph in zip(preds, photos)])),
        "all": float(np.mean([attrs_match(p, ph) for p, ph in zip(preds, photos)])),
    }


if __name__ == "__main__":  # the command docs/miniature.md gives; the code is faceid/tiny/pretrain.py
    from faceid.tiny.pretrain import main

    main()
