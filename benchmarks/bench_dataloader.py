"""Data-loader throughput: our training loader vs a faithful re-implementation of MFaceTech's.

    python benchmarks/bench_dataloader.py [--num_images 48] [--workers 2] [--resolution 1024] [--rounds 3]

Writes ``num_images`` 1024×1280 photo-like PNGs (plus embeddings) to a temp folder, then times both loaders
(``DataLoader``, ``workers`` processes, batch size 2), alternating for ``rounds`` passes each, and prints samples/s
per pass (after a warm-up batch), the medians, and CPU time per sample (workers included).

The MFaceTech loader (``utils``-free, torchvision replaced by PIL/numpy equivalents) does what its
``MyDataset.__getitem__`` does: open the image, draw the keypoints on a float64 full-resolution canvas with a
full copy per limb and per dot, resize the *full* image and the *full* keypoint image to the short side,
convert both to tensors, then crop; ``torch.load`` the embedding; tokenise with both tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faceid.train.batch_pool import map_loader  # noqa: E402
from faceid.train.dataset import EpochBatchSampler, FaceTrainDataset  # noqa: E402
from faceid.train.records import _torch_load, load_checked_records  # noqa: E402
from faceid.train.transforms import tokenize  # noqa: E402

KPS = [[420.0, 520.0], [610.0, 515.0], [515.0, 640.0], [440.0, 760.0], [595.0, 755.0]]


# ---- MFaceTech's loader, torchvision replaced by PIL/numpy ------------------------------------------------
def mft_draw_kps(
    image_pil, kps, color_list=((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
):
    stickwidth = 4
    limb_seq = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    w, h = image_pil.size
    out_img = np.zeros([h, w, 3])
    for i in range(len(limb_seq)):
        index = limb_seq[i]
        color = color_list[index[0]]
        x = kps[index][:, 0]
        y = kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(x)), int(np.mean(y))), (int(length / 2), stickwidth), int(angle), 0, 360, 1
        )
        out_img = cv2.fillConvexPoly(out_img.copy(), polygon, color)
    out_img = (out_img * 0.6).astype(np.uint8)
    for idx_kp, kp in enumerate(kps):
        color = color_list[idx_kp]
        x, y = kp
        out_img = cv2.circle(out_img.copy(), (int(x), int(y)), 10, color, -1)
    return Image.fromarray(out_img.astype(np.uint8))


def _resize_short(img: Image.Image, size: int) -> Image.Image:  # transforms.Resize(size, BILINEAR) on PIL
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return img.resize((nw, nh), Image.BILINEAR)


def _to_tensor(img: Image.Image) -> torch.Tensor:  # transforms.ToTensor
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)


class MFaceTechDataset(torch.utils.data.Dataset):
    def __init__(self, json_file, tokenizer, tokenizer_2, size=1024, center_crop=True, root=""):
        self.tokenizer, self.tokenizer_2, self.size, self.center_crop, self.root = (
            tokenizer,
            tokenizer_2,
            size,
            center_crop,
            root,
        )
        self.data = [json.loads(line) for line in open(json_file)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        item = self.data[idx]
        text = item["additional_feature"]
        raw_image = Image.open(os.path.join(self.root, item["file_name"]))
        kps_image = mft_draw_kps(raw_image.convert("RGB"), item["landmarks"])
        original_width, original_height = raw_image.size
        original_size = torch.tensor([original_height, original_width])
        image_tensor = (_to_tensor(_resize_short(raw_image.convert("RGB"), self.size)) - 0.5) / 0.5
        kps_image_tensor = _to_tensor(_resize_short(kps_image, self.size))
        delta_h = image_tensor.shape[1] - self.size
        delta_w = image_tensor.shape[2] - self.size
        if self.center_crop:
            top, left = delta_h // 2, delta_w // 2
        else:
            top, left = np.random.randint(0, delta_h // 2 + 1), np.random.randint(0, delta_w + 1)
        image = image_tensor[:, top : top + self.size, left : left + self.size]
        kps_image = kps_image_tensor[:, top : top + self.size, left : left + self.size]
        face_id_embed = torch.from_numpy(
            _torch_load(os.path.join(self.root, item["insightface_feature_file"]))
        )
        face_id_embed = face_id_embed.reshape(1, -1)
        rand_num = random.random()
        drop_feature_embed = drop_text_embed = 0
        if rand_num < 0.05:
            drop_feature_embed = 1
        elif rand_num < 0.1:
            drop_text_embed = 1
        elif rand_num < 0.15:
            drop_text_embed = drop_feature_embed = 1
        if drop_text_embed:
            text = ""
        if drop_feature_embed:
            face_id_embed = torch.zeros_like(face_id_embed)
        return {
            "image": image,
            "kps_image": kps_image,
            "text_input_ids": tokenize(self.tokenizer, text),
            "text_input_ids_2": tokenize(self.tokenizer_2, text),
            "face_id_embed": face_id_embed,
            "original_size": original_size,
            "crop_coords_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor([self.size, self.size]),
        }


def mft_collate(data):
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


# ---- data --------------------------------------------------------------------------------------------------
def make_data(root: Path, n: int, size=(1024, 1280)) -> tuple[Path, Path]:
    """Photo-like PNGs (smooth gradients + mild noise, so PNG sizes/decoding are realistic) and both indexes."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ours, mft = [], []
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack([(xx / w) * 200 + 20 * i % 50, (yy / h) * 180, ((xx + yy) / (w + h)) * 220], -1)
        img = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img" / f"{i}.png", compress_level=6)
        emb = rng.standard_normal(512).astype(np.float32)
        np.save(root / "img" / f"{i}.npy", emb)
        torch.save(emb, root / "img" / f"{i}.bin")
        ours.append({"id": str(i), "image": f"img/{i}.png", "caption": "a photo of a person", "kps": KPS,
                     "width": w, "height": h, "embedding": {"file": f"img/{i}.npy"}})  # fmt: skip
        mft.append({"file_name": f"img/{i}.png", "additional_feature": "a photo of a person", "bbox": [0, 0, 1, 1],
                    "landmarks": KPS, "insightface_feature_file": f"img/{i}.bin"})  # fmt: skip
    (root / "ours.jsonl").write_text("\n".join(map(json.dumps, ours)) + "\n")
    (root / "mft.jsonl").write_text("\n".join(map(json.dumps, mft)) + "\n")
    return root / "ours.jsonl", root / "mft.jsonl"


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(loader) -> tuple[float, float]:
    """(samples/s over one pass after the first batch, so worker start-up is not counted; CPU ms per sample of the
    whole pass, workers included: they are reaped when the pass ends)."""
    c0 = _cpu_seconds()
    it = iter(loader)
    first = next(it)
    n0 = n = len(next(iter(first.values())))
    t0 = time.perf_counter()
    for batch in it:
        n += len(next(iter(batch.values())))
    rate = (n - n0) / (time.perf_counter() - t0)
    del it, first, batch
    return rate, (_cpu_seconds() - c0) / n * 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=48)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3, help="the two loaders alternate, this many passes each")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import CLIPTokenizer

    from faceid.tiny.models import write_tiny_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours_idx, mft_idx = make_data(tmp / "data", args.num_images)
        tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp / "tok"))
        records, _ = load_checked_records(str(ours_idx))
        ds = FaceTrainDataset(records, (tok, tok), resolution=args.resolution, cross_id=True)
        sampler = EpochBatchSampler(ds.bucket_groups(), args.batch_size, seed=0)
        mft = MFaceTechDataset(mft_idx, tok, tok, size=args.resolution, root=str(tmp / "data"))

        def ours_loader():  # what the trainer iterates (faceid.train.config.build_data)
            return map_loader(ds, sampler, args.workers)

        def mft_loader():
            return torch.utils.data.DataLoader(
                mft,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                collate_fn=mft_collate,
            )

        # single-sample timings in this process (what one worker spends per sample)
        t0 = time.perf_counter()
        for i in range(8):
            ds[(i, 0)]
        ours_one = (time.perf_counter() - t0) / 8
        t0 = time.perf_counter()
        for i in range(8):
            mft[i]
        mft_one = (time.perf_counter() - t0) / 8
        rows = {"MFaceTech": [], "ours": []}
        for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits both alike
            rows["MFaceTech"].append(time_loader(mft_loader()))
            rows["ours"].append(time_loader(ours_loader()))
    med = {k: float(np.median([r[0] for r in v])) for k, v in rows.items()}
    cpu = {k: float(np.median([r[1] for r in v])) for k, v in rows.items()}
    print(
        f"1024x1280 PNG -> {args.resolution}px, {args.workers} workers, batch {args.batch_size}, "
        f"{args.num_images} images, {args.rounds} interleaved rounds, cpus: {os.cpu_count()}, "
        f"load avg {' / '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"  per sample (1 process): MFaceTech {mft_one * 1000:7.1f} ms   ours {ours_one * 1000:7.1f} ms")
    print(f"  {'loader':10s} {'samples/s per round':>26s} {'median':>8s} {'CPU ms/sample':>14s}")
    for k, v in rows.items():
        per = " / ".join(f"{r[0]:.1f}" for r in v)
        print(f"  {k:10s} {per:>26s} {med[k]:8.1f} {cpu[k]:14.1f}")
    print(
        f"  speed-up (median samples/s): {med['ours'] / med['MFaceTech']:.2f}x;"
        f" CPU time per sample: {cpu['MFaceTech'] / cpu['ours']:.2f}x less"
    )
    return med["MFaceTech"], med["ours"]


if __name__ == "__main__":
    main()
