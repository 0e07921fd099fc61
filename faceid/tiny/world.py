"""The learnable miniature world: synthetic persons, their photos and captions, and the script that pretrains the
tiny VAE, SDXL UNet (+ text encoders) and face recognizer on them.

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

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# The attribute classifier's thresholds (on colour differences, 0..255), set on VAE reconstructions of photos.
GLASSES_THRESHOLD = 12.0
SMILE_THRESHOLD = 16.0
# Recognizer: 112 -> 56 -> 28 -> 14 -> 7 -> 4 (stride-2 3x3 convs + ReLU), flatten, Gemm -> 512.
REC_CHANNELS = (16, 32, 48, 64, 32)


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
        ARCFACE_DST / 112.0 * np.array([x2 - x1, y2 - y1], np.float32) + np.array([x1, y1], np.float32)
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

    m = similarity_matrix(kps, ARCFACE_DST)
    return cv2.warpAffine(np.ascontiguousarray(img), m, (112, 112), borderValue=0.0)


def crops_to_input(crops: np.ndarray) -> np.ndarray:
    """[N,112,112,3] RGB uint8 -> the recognizer's input (what insightface's blobFromImages gives it)."""
    return ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


# ---------------------------------------------------------------------------------------------------------------
# Recognizer (torch for training; exported to ONNX by faceid.tiny.antelope with the same ops)


def recognizer_torch():
    import torch
    from torch import nn

    layers, cin = [], 3
    for c in REC_CHANNELS:
        layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.ReLU()]
        cin = c
    layers += [nn.Flatten(), nn.Linear(cin * 4 * 4, 512)]
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def recognizer_arrays(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    convs = [k[: -len(".weight")] for k in sd if k.endswith(".weight") and sd[k].ndim == 4]
    lin = [k[: -len(".weight")] for k in sd if k.endswith(".weight") and sd[k].ndim == 2][0]
    out = {}
    for i, k in enumerate(convs):
        out[f"conv{i}.weight"], out[f"conv{i}.bias"] = sd[k + ".weight"], sd[k + ".bias"]
    out["fc.weight"], out["fc.bias"] = sd[lin + ".weight"], sd[lin + ".bias"]
    return out


def decoded_like(img: np.ndarray, rng=None, cell_noise: float = 0.0) -> np.ndarray:
    """What the world's VAE gives back for ``img`` (float RGB [H,W,3]): the 8x8-cell colour means painted back
    (the constructed VAE's round trip, within 1 grey level), with optional per-cell colour noise of std
    ``cell_noise`` (the errors of a generated latent)."""
    h, w, _ = img.shape
    cells = img.reshape(h // 8, 8, w // 8, 8, 3).mean((1, 3))
    if rng is not None and cell_noise > 0:
        cells = cells + rng.normal(0, cell_noise, cells.shape)
    return cells.repeat(8, 0).repeat(8, 1)


def _recognizer_batch(rng, n, persons, codes, blur: bool = True, decoded: float = 0.5):
    """Aligned crops (with photo-level and generation-like perturbations) and person labels. A share ``decoded``
    of the photos is seen as the VAE paints it (with per-cell noise), aligned on the face box found in it, as
    Face Sim reads a generated image: identity must survive what the world's models can draw."""
    import cv2

    crops, labels = [], []
    for _ in range(n):
        p = int(rng.choice(persons))
        photo = random_photo(rng, p)
        img = render(photo, codes, seed=int(rng.integers(1 << 31))).astype(np.float32)
        box = photo.box
        if rng.random() < decoded:
            img = np.clip(decoded_like(img, rng, rng.uniform(0, 24)), 0, 255)
            box = find_face_box(img) or box
        elif blur and rng.random() < 0.7:
            s = rng.uniform(0.3, 1.4)
            img = cv2.GaussianBlur(img, (0, 0), s)
        img = img + rng.normal(0, rng.uniform(0, 10), img.shape) + rng.uniform(-10, 10, (1, 1, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        kps = box_kps(box) + rng.normal(0, 0.6, (5, 2)).astype(np.float32)
        crops.append(fast_crop(img, kps))
        labels.append(p)
    return crops_to_input(np.stack(crops)), np.array(labels)


def train_recognizer(steps: int = 300, batch: int = 48, log=print):
    """CosFace-trained tiny recognizer over the world's persons (like ArcFace over people)."""
    import torch
    import torch.nn.functional as F

    codes = person_codes()
    model = recognizer_torch()
    torch.manual_seed(1)
    classes = torch.nn.Parameter(torch.randn(NUM_PERSONS, 512) * 0.01)
    opt = torch.optim.Adam(list(model.parameters()) + [classes], lr=2e-3)
    rng = np.random.default_rng(WORLD_SEED + 1)
    persons = list(range(NUM_PERSONS))
    scale, margin = 16.0, 0.2
    for step in range(steps):
        x, y = _recognizer_batch(rng, batch, persons, codes)
        emb = F.normalize(model(torch.from_numpy(x)), dim=1)
        cos = emb @ F.normalize(classes, dim=1).T
        y = torch.from_numpy(y)
        logits = scale * (cos - margin * F.one_hot(y, NUM_PERSONS))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"recognizer {step:5d} loss {loss.item():.3f}")
    return model.eval()


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


# ---------------------------------------------------------------------------------------------------------------
# VAE and UNet pretraining


def to_pixels(imgs: np.ndarray):
    import torch

    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def construct_vae(vae, const: float = 50.0, shift: float = 10.0) -> None:
    """Set ``vae`` (AutoencoderKL, one norm group, no mid attention) to an exact colour autoencoder: the latents'
    first three channels are the RGB means of 8x8 cells, the decoder paints them back (nearest).

    Every ResNet branch is zeroed (blocks = identity or channel copy), downsamplers average 2x2, upsamplers copy.
    The only remaining non-linear steps are the two output GroupNorm + SiLU: a large constant channel plus
    negated copies of the colours make the group's mean and variance image-independent (so the norm is a fixed
    affine map), and a shift keeps SiLU in its linear range. Gradient descent refines this start
    (:func:`train_vae`): a random start does not learn colours in a CPU budget."""
    import torch

    def copy_conv(conv, pairs, center=True):
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
        k = conv.weight.shape[-1]
        for o, i, w in pairs:
            if center:
                conv.weight[o, i, k // 2, k // 2] = w
            else:
                conv.weight[o, i, :2, :2] = w / 4.0

    def carry(n):  # channels 0-2 colour, 3-5 negated colour, 6 constant
        return [(c, c, 1.0) for c in range(n)]

    def norm_out(norm, conv_out, out_pairs, bias_out):
        c = norm.num_channels
        sigma = const * math.sqrt(c - 1) / c
        norm.weight.fill_(sigma)
        norm.bias.fill_(const / c + shift)
        copy_conv(conv_out, out_pairs)
        conv_out.bias.copy_(torch.as_tensor(bias_out, dtype=conv_out.bias.dtype))

    def identity_resnet(r):
        r.conv2.weight.zero_()
        r.conv2.bias.zero_()
        if r.conv_shortcut is not None:
            copy_conv(r.conv_shortcut, carry(min(r.conv_shortcut.in_channels, r.conv_shortcut.out_channels)))

    with torch.no_grad():
        enc, dec = vae.encoder, vae.decoder
        copy_conv(enc.conv_in, [(c, c, 1.0) for c in range(3)] + [(3 + c, c, -1.0) for c in range(3)])
        enc.conv_in.bias[6] = const
        for block in enc.down_blocks:
            for r in block.resnets:
                identity_resnet(r)
            for d in block.downsamplers or []:
                copy_conv(d.conv, carry(7), center=False)
        for r in enc.mid_block.resnets:
            identity_resnet(r)
        lc = vae.config.latent_channels
        bias = [-shift] * 3 + [0.0] * (lc - 3) + [-16.0] * lc  # logvar -16: std 3e-4
        norm_out(enc.conv_norm_out, enc.conv_out, [(c, c, 1.0) for c in range(3)], bias)
        copy_conv(vae.quant_conv, [(c, c, 1.0) for c in range(2 * lc)])
        copy_conv(vae.post_quant_conv, [(c, c, 1.0) for c in range(lc)])
        copy_conv(dec.conv_in, [(c, c, 1.0) for c in range(3)] + [(3 + c, c, -1.0) for c in range(3)])
        dec.conv_in.bias[6] = const
        for r in dec.mid_block.resnets:
            identity_resnet(r)
        for block in dec.up_blocks:
            for r in block.resnets:
                identity_resnet(r)
            for u in block.upsamplers or []:
                copy_conv(u.conv, carry(7))
        norm_out(dec.conv_norm_out, dec.conv_out, [(c, c, 1.0) for c in range(3)], [-shift] * 3)


def train_vae(vae, steps: int = 150, batch: int = 16, crop: int = 32, lr: float = 3e-4, log=print):
    """Reconstruction (L1 + L2) with a small KL, on random ``crop``-pixel windows of photos (fully
    convolutional: the same weights then work on whole images at a quarter of the cost)."""
    import torch

    construct_vae(vae)
    if steps <= 0:
        return vae.eval()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    rng = np.random.default_rng(WORLD_SEED + 2)
    for step in range(steps):
        imgs, _ = sample_photos(batch, list(range(NUM_PERSONS)), seed=10_000 + step)
        oy, ox = (int(v) * 8 for v in rng.integers(0, (IMAGE_SIZE - crop) // 8 + 1, 2))
        x = to_pixels(np.ascontiguousarray(imgs[:, oy : oy + crop, ox : ox + crop]))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + torch.nn.functional.mse_loss(rec, x) + 1e-3 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae {step:5d} loss {loss.item():.4f} kl {kl.item():.4f}")
    return vae.eval()


def encode_captions(tokenizers, encoders, captions):
    """SDXL conditioning as the trainer and the pipeline compute it (penultimate states; pooled from enc 2)."""
    import torch

    embeds, pooled = [], None
    for tok, enc in zip(tokenizers, encoders):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        out = enc(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def all_captions() -> list[str]:
    return [caption_for(g, s, b) for g in (False, True) for s in (False, True) for b in BACKGROUNDS]


def train_unet(pipe, scaling, steps: int = 1200, batch: int = 32, pool: int = 4096, log=print):
    """Text-conditioned denoising pretraining of the UNet on latents of world photos. The text encoders stay as
    built (frozen, like SDXL's CLIPs); the world's 12 captions are encoded once."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    unet, vae = pipe.unet, pipe.vae
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    encs = [pipe.text_encoder, pipe.text_encoder_2]
    toks = [pipe.tokenizer, pipe.tokenizer_2]
    params = list(unet.parameters())
    with torch.no_grad():
        caps = all_captions()
        cap_emb, cap_pooled = encode_captions(toks, encs, caps)
    cap_index = {c: i for i, c in enumerate(caps)}
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=max(0.05, 3 / steps))
    unet.train()
    g = torch.Generator().manual_seed(3)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    ema = None
    # A pool of encoded photos (posterior mean and std), sampled anew each step.
    pool_mean, pool_std, pool_cap = [], [], []
    with torch.no_grad():
        for k in range(pool // 64):
            imgs, photos = sample_photos(64, list(range(NUM_PERSONS)), seed=50_000 + k)
            d = vae.encode(to_pixels(imgs)).latent_dist
            pool_mean.append(d.mean)
            pool_std.append(d.std)
            pool_cap += [cap_index[p.caption] for p in photos]
    pool_mean, pool_std, pool_cap = torch.cat(pool_mean), torch.cat(pool_std), torch.tensor(pool_cap)
    for step in range(steps):
        sel = torch.randint(0, len(pool_cap), (batch,), generator=g)
        lat = (pool_mean[sel] + pool_std[sel] * torch.randn(pool_mean[sel].shape, generator=g)) * scaling
        ix = pool_cap[sel]
        emb, pooled = cap_emb[ix], cap_pooled[ix]
        drop = (torch.rand(batch, generator=g) < 0.1).float()
        # force_zeros_for_empty_prompt: the pipeline's unconditional input is zeros.
        emb = emb * (1 - drop)[:, None, None]
        pooled = pooled * (1 - drop)[:, None]
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)}).sample  # fmt: skip
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet {step:5d} loss {ema:.4f}")
    unet.eval()
    return unet


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


# ---------------------------------------------------------------------------------------------------------------
# The build script


def save_fp16(module_or_dict, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sd = module_or_dict if isinstance(module_or_dict, dict) else module_or_dict.state_dict()
    sd = {k: (torch.as_tensor(v).to(torch.float16) if torch.as_tensor(v).is_floating_point() else torch.as_tensor(v))
          .contiguous() for k, v in sd.items()}  # fmt: skip
    save_file(sd, str(path))
    __import__("faceid.files").files.apply_umask(path)  # safetensors writes 0600 whatever the umask


def _update_info(out: Path, key: str, value: dict) -> dict:
    path = out / "world.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update({"seed": WORLD_SEED, "image_size": IMAGE_SIZE, "num_persons": NUM_PERSONS, key: value})
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def build_world(out: Path, parts, vae_steps: int, unet_steps: int, rec_steps: int, log=print) -> dict:
    """Pretrain ``parts`` (``recognizer``, ``vae``, ``unet``; the UNet needs the VAE in ``out``) into ``out``."""
    import tempfile

    import torch

    from faceid.tiny.models import build_tiny_sdxl, load_world_weights

    out.mkdir(parents=True, exist_ok=True)
    info = {}
    if "recognizer" in parts:
        t = time.time()
        rec = train_recognizer(rec_steps, log=log)
        save_fp16(recognizer_arrays(rec), out / "recognizer.safetensors")
        info = _update_info(out, "recognizer", {"steps": rec_steps, "seconds": round(time.time() - t)})
    if "vae" not in parts and "unet" not in parts:
        return info
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_sdxl(Path(tmp) / "sdxl", seed=0, weights=None)
    if "vae" in parts:
        torch.manual_seed(0)
        t = time.time()
        train_vae(pipe.vae, vae_steps, log=log)
        save_fp16(pipe.vae, out / "vae.safetensors")
        load_world_weights(pipe, out, parts=("vae",))
        scaling = 1.0 / latent_std(pipe.vae, 1.0)
        info = _update_info(out, "vae", {"steps": vae_steps, "seconds": round(time.time() - t),
                                         "scaling_factor": scaling})  # fmt: skip
    if "unet" in parts:
        load_world_weights(pipe, out, parts=("vae",))  # train on the committed (fp16-rounded) VAE
        torch.manual_seed(0)
        t = time.time()
        train_unet(pipe, pipe.vae.config.scaling_factor, unet_steps, log=log)
        save_fp16(pipe.unet, out / "unet.safetensors")
        info = _update_info(out, "unet", {"steps": unet_steps, "seconds": round(time.time() - t)})
    return info


def measure_world(root: Path, log=print) -> dict:
    """Figures of an assembled tiny world (``build_tiny(root)``): VAE, recognizer, base model."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from faceid.tiny.antelope import RECOGNIZER_FILE
    from faceid.tiny.models import tiny_paths

    paths = tiny_paths(root)
    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base_model"], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    sf = pipe.vae.config.scaling_factor
    res = {"scaling_factor": sf, "latent_std": latent_std(pipe.vae, sf)}
    res["vae_reconstruction"] = vae_reconstruction(pipe.vae)
    import onnxruntime

    sess = onnxruntime.InferenceSession(
        str(paths["antelopev2"] / RECOGNIZER_FILE), providers=["CPUExecutionProvider"]
    )
    res["recognizer"] = recognizer_stats(lambda x: sess.run(None, {"input.1": x})[0])
    res["recognizer_on_decoded"] = recognizer_stats(lambda x: sess.run(None, {"input.1": x})[0], decoded=True)
    with torch.no_grad():
        res["base_model_following"] = base_model_following(pipe)
    log(json.dumps(res, indent=2))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Pretrain the tiny world's VAE, UNet, text encoders and recognizer."
    )
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--vae_steps", type=int, default=0)
    p.add_argument("--unet_steps", type=int, default=3000)
    p.add_argument("--recognizer_steps", type=int, default=700)
    p.add_argument("--parts", default="recognizer,vae,unet", help="comma-separated subset to (re)train")
    p.add_argument("--measure", default=None, metavar="DIR", help="only measure the world assembled in DIR")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("WORLD_THREADS", "1")))
    if args.measure:
        return measure_world(Path(args.measure))
    info = build_world(Path(args.out), args.parts.split(","), args.vae_steps, args.unet_steps,
                       args.recognizer_steps)  # fmt: skip
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
