"""Training that reports identity while it runs (docs/training.md, "Monitoring identity and collapse").

* :func:`split_persons` (in :mod:`faceid.train.records`): a validation set of persons held out of training, taken
  from the index deterministically.
* :class:`IdentityValidation`: at each ``--validation_steps``, one image per held-out person generated with fixed
  seeds from the person's reference photo, scored by the face recognizer against the person's *other* photos and
  other persons (:mod:`faceid.eval.identity`: same, different, margin, copy-paste) and CLIP-T when a CLIP model is
  given.
* :class:`CollapseProbe`: every ``--collapse_check_steps``, without generation: the spread of the Resampler's face
  tokens across the persons of a fixed batch, and the denoising-loss gap between a wrong and the right person's
  face at fixed noise. Warns once when the spread falls below a fraction of its start or the gap stays at zero.

The trainer passes in what packages cannot import (the pipeline is a top-level script): ``generate(requests)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from types import SimpleNamespace

import numpy as np

from faceid.eval.identity import identity_scores, mean_scores
from faceid.train.records import Person, group_persons, split_persons  # noqa: F401  (split_persons' old home: config.py imports it here)

logger = logging.getLogger(__name__)

# The collapse warning (docs/training.md names the same causes and remedies).
SPREAD_FRACTION = 0.1  # token spread below this share of its start value
GAP_ZERO = 1e-3  # |loss gap| below this (relative) counts as "no use of the face"
GAP_PATIENCE = 3  # ... in this many probes in a row, after the start
COLLAPSE_REMEDIES = (
    "Likely causes: the learning rate is too high for the Resampler (it collapsed within 25 steps at 1e-2 in the "
    "miniature world), dropped captions encoded as the empty prompt instead of zeros (--no-text_drop_zeros), an "
    "untrained IdentityNet/adapter that disturbs the frozen UNet (start from the official weights or a quiet "
    "Resampler), or face embeddings that do not match the target person (check person_id and --cross_id). "
    "Remedies (docs/training.md, Monitoring identity and collapse): lower --learning_rate or warm it up, keep "
    "--text_drop_zeros, train the adapter first "
    "(--no-train_identitynet), check the index."
)


# ------------------------------------------------------------------------------------------------ the held-out set


# ------------------------------------------------------------------------------------------------ validation


def _kps_condition(rec, resolution: int):
    """(keypoints, (W, H)) for a record, centre-cropped like training."""
    from faceid.train.transforms import plan_crop, transform_kps

    plan = plan_crop(rec.width, rec.height, (resolution, resolution))
    return np.asarray(transform_kps(rec.kps, plan), np.float32), tuple(plan.target)


class IdentityValidation:
    """Scores generations of the held-out persons (see the module doc). ``analyzer``: a
    :class:`faceid.face.analysis.FaceAnalyzer`; ``clip``: a :class:`faceid.eval.metrics.ClipScorer` or None."""

    def __init__(self, persons: list[Person], analyzer, resolution: int, seed: int, clip=None, prompt=None):
        from faceid.train.errors import TrainingInputError
        from faceid.train.records import load_embedding

        if len(persons) < 2:
            raise TrainingInputError(
                f"identity validation needs two or more persons with two or more photos each, got {len(persons)}"
            )
        self.persons, self.analyzer, self.clip, self.seed = persons, analyzer, clip, seed
        self.requests, self.kps = [], []
        for k, p in enumerate(persons):
            kps, size = _kps_condition(p.reference, resolution)
            caption = prompt or p.reference.caption or "a photo of a person"
            # Fixed seeds: successive validations differ only by the weights.
            self.requests.append((load_embedding(p.reference.embedding), kps, size, caption, seed + k))
            self.kps.append(kps)
        # The photos are embedded by the same recognizer as the generations (the index's may come from another).
        self.photo_emb = {}
        for p in persons:
            for r in [p.reference, *p.others]:
                face = analyzer.analyze(r.image)
                self.photo_emb[r.key] = (
                    np.asarray(face.embedding) if face else np.asarray(load_embedding(r.embedding))
                )
        self.text_emb = clip.text_embeds([q[3] for q in self.requests]) if clip is not None else None

    def _embed(self, image, kps) -> tuple[np.ndarray, bool]:
        """The recognizer's embedding of the face found in a generated image; where none is found, of the crop at
        the conditioning keypoints (a face that is not there scores low rather than not at all)."""
        from faceid.face.images import to_bgr

        face = self.analyzer.analyze(image)
        if face:
            return np.asarray(face.embedding), True
        crop = self.analyzer.align(to_bgr(image.convert("RGB")), kps)
        return self.analyzer.embed_crops([crop])[0], False

    def run(self, generate) -> tuple[dict, list]:
        """``generate(requests) -> PIL images`` → (scalars, images). A request is (embedding, keypoints, size,
        prompt, seed): the trainer's ``validation_request`` arguments."""
        t0 = time.perf_counter()
        images = generate(self.requests)
        rows, found = [], []
        for k, (p, img) in enumerate(zip(self.persons, images)):
            g, ok = self._embed(img, self.kps[k])
            found.append(ok)
            diff = [
                self.photo_emb[r.key] for q in self.persons if q is not p for r in [q.reference, *q.others]
            ]
            rows.append(
                identity_scores(
                    g,
                    self.photo_emb[p.reference.key],
                    [self.photo_emb[r.key] for r in p.others],
                    np.stack(diff),
                )
            )
        m = mean_scores(rows)
        out = {f"val_{k}": v for k, v in m.items()}
        out["val_face_found"] = float(np.mean(found))
        if self.clip is not None:
            from faceid.eval.metrics import clip_score

            img_emb = self.clip.image_embeds(images)
            out["val_clip_t"] = float(np.mean([clip_score(i, t) for i, t in zip(img_emb, self.text_emb)]))
        out["val_seconds"] = time.perf_counter() - t0
        return out, images


# ------------------------------------------------------------------------------------------------ collapse probe


def token_spread(tokens) -> float:
    """Mean over pairs of persons of the RMS distance between their face tokens (``[P, T, C]``): 0 when the
    Resampler maps every face to the same tokens."""
    import torch

    x = tokens.float().flatten(1) / tokens.shape[1] ** 0.5
    d = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0]  # exact near 0
    p = x.shape[0]
    return float(d.sum() / max(p * (p - 1), 1))


class CollapseProbe:
    """The fixed probe batch (one photo per person, no caption/face drops, centre crop), measured with the
    trainer's own loss at fixed noise and timesteps. ``parts``: the trainer's components, ``model`` the unwrapped
    TrainModel."""

    def __init__(self, records, parts, args, num_persons: int = 8, start: dict | None = None):
        import torch

        from faceid.train.dataset import FaceTrainDataset, collate
        from faceid.train.model import CondCache

        seen, picked = set(), []
        for r in records:
            pid = r.person_id if r.person_id is not None else r.key
            if pid not in seen:
                seen.add(pid)
                picked.append(r)
            if len(picked) == num_persons:
                break
        if len(picked) < 2:
            raise ValueError("the collapse probe needs photos of two or more persons")
        ds = FaceTrainDataset(
            picked, (parts["tokenizer"], parts["tokenizer_2"]), resolution=args.resolution, seed=args.seed,
            text_drop=0.0, face_drop=0.0, both_drop=0.0,
        )  # fmt: skip
        self.batch = collate([ds[i] for i in range(len(picked))])
        self.n, self.chunk = len(picked), max(1, args.train_batch_size)
        self.args = SimpleNamespace(**{**vars(args), "id_loss_weight": 0.0})  # the denoising loss alone
        self.parts, self.cache = parts, CondCache(True, True)
        self.torch = torch
        self.alarm = CollapseAlarm((start or {}).get("token_spread"))

    def measure(self, model, weight_dtype, device, autocast=contextlib.nullcontext) -> dict:
        """``token_spread`` and ``loss_gap`` = (loss with a wrong person's face − loss with the right one) / the
        right one's, same noise and timesteps; ``probe_seconds``."""
        torch = self.torch
        from faceid.train.model import compute_loss, micro_generator

        t0 = time.perf_counter()
        was = model.image_proj.training
        model.image_proj.eval()
        parts = dict(self.parts, model=model)
        wrong = dict(self.batch, face_embeds=self.batch["face_embeds"].roll(1, dims=0))
        # autocast as in training: with fp16/bf16 the frozen UNet runs in half precision, the trained layers in fp32
        with torch.no_grad(), autocast():
            emb = self.batch["face_embeds"].to(device, model.image_proj.proj_in.weight.dtype)
            spread = token_spread(model.image_proj(emb))
            losses = []
            for b in (self.batch, wrong):
                gen = micro_generator(self.args.seed, -1, 0, device)  # the same noise for both
                # In chunks of the training batch: the probe never needs more memory than a training step.
                parts_ = [
                    compute_loss(_rows(b, i, i + self.chunk), parts, self.args, gen, weight_dtype, self.cache)
                    * len(range(i, min(i + self.chunk, self.n)))
                    for i in range(0, self.n, self.chunk)
                ]
                losses.append(float(sum(parts_)) / self.n)
        model.image_proj.train(was)
        gap = (losses[1] - losses[0]) / max(losses[0], 1e-12)
        return {"token_spread": spread, "loss_gap": gap, "probe_seconds": time.perf_counter() - t0}


class CollapseAlarm:
    """When to warn (once): the token spread below ``fraction`` × its start value, or ``|loss gap|`` below
    ``gap_zero`` in ``patience`` probes in a row after the start (the start itself is ~0 with quiet tokens)."""

    def __init__(self, start_spread: float | None = None, fraction=SPREAD_FRACTION, gap_zero=GAP_ZERO,
                 patience=GAP_PATIENCE):  # fmt: skip
        self.start, self.fraction, self.gap_zero, self.patience = start_spread, fraction, gap_zero, patience
        self.zero_run, self.warned = 0, False

    def check(self, step: int, spread: float, gap: float) -> str | None:
        """The warning's text the first time the signal says so, else None."""
        if self.start is None:
            self.start = spread
        if step > 0:
            self.zero_run = self.zero_run + 1 if abs(gap) < self.gap_zero else 0
        why = None
        if step > 0 and self.start > 0 and spread < self.fraction * self.start:
            why = f"face-token spread {spread:.4g} fell below {self.fraction:g} × its start value {self.start:.4g}"
        elif self.zero_run >= self.patience:
            why = (f"the loss gap between a wrong and the right face stayed below {self.gap_zero:g} for "
                   f"{self.patience} probes")  # fmt: skip
        if why is None or self.warned:
            return None
        self.warned = True
        return (f"step {step}: the Resampler is collapsing ({why}): the model is learning to ignore the face. "
                f"{COLLAPSE_REMEDIES}")  # fmt: skip


def _rows(batch: dict, a: int, b: int) -> dict:
    return {k: v[a:b] for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ the trainer's hook


def _start_values(train_log: str) -> dict:
    """The first logged token spread of a resumed run (the warning compares with the run's start)."""
    if not os.path.isfile(train_log):
        return {}
    with open(train_log, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "token_spread" in row:
                return {"token_spread": row["token_spread"]}
    return {}


class TrainingMonitor:
    """What the trainer calls: :meth:`at_step` after each optimisation step (and once before the first), on the
    main process. ``log_scalars(step, dict)`` writes trackers + train_log.jsonl; ``generate(requests)`` generates
    with the weights being trained."""

    def __init__(
        self,
        args,
        parts,
        model,
        records,
        held_out,
        weight_dtype,
        device,
        log_scalars,
        generate,
        log=None,
        autocast=contextlib.nullcontext,
    ):
        self.args, self.model, self.dtype, self.device = args, model, weight_dtype, device
        self.log_scalars, self.generate, self.log = log_scalars, generate, log or logger
        self.autocast = autocast
        self.validation = self.probe = None
        if args.collapse_check_steps and records:
            start = _start_values(os.path.join(args.output_dir, "train_log.jsonl"))
            self.probe = CollapseProbe(records, parts, args, args.collapse_probe_persons, start)
        elif args.collapse_check_steps:
            self.log.warning("the collapse probe needs an index (--data_json_file/--train_data_dir); skipped")
        if args.validation_steps and (held_out or args.validation_index):
            self.validation = IdentityValidation(
                group_persons(load_validation_records(args) if args.validation_index else held_out,
                              args.validation_max_persons),
                make_analyzer(args.validation_face_model), args.resolution, args.seed,
                clip=make_clip(args.validation_clip_model, device), prompt=args.validation_identity_prompt,
            )  # fmt: skip

    @classmethod
    def wanted(cls, args) -> bool:
        return bool(
            args.collapse_check_steps
            or (args.validation_steps and (args.validation_persons or args.validation_index))
        )

    def at_step(self, step: int) -> dict:
        out = {}
        if self.probe is not None and step % self.args.collapse_check_steps == 0:
            out.update(self.probe.measure(self.model, self.dtype, self.device, self.autocast))
            msg = self.probe.alarm.check(step, out["token_spread"], out["loss_gap"])
            if msg:
                self.log.warning(msg)
                out["collapse_warning"] = 1.0
        if self.validation is not None and step % self.args.validation_steps == 0:
            scores, images = self.validation.run(self.generate)
            out.update(scores)
            save_strip(images, os.path.join(self.args.output_dir, "validation", f"identity-{step:07d}.png"))
        if out:
            self.log_scalars(step, out)
        return out


def load_validation_records(args):
    from faceid.train.records import load_checked_records

    records, _ = load_checked_records(args.validation_index, "auto", None, args.person_id_from_folder, True)
    return records


def make_analyzer(path: str):
    from faceid.eval.metrics import make_face_analyzer
    from faceid.face.analysis import NoFaceModelError
    from faceid.train.errors import TrainingInputError

    try:
        return make_face_analyzer(path)
    except NoFaceModelError as exc:
        raise TrainingInputError(
            f"identity validation needs the face models (--validation_face_model): {exc}"
        ) from exc


def make_clip(path: str | None, device):
    if not path:
        return None
    from faceid.eval.metrics import ClipScorer

    return ClipScorer(path, device=str(device))


def save_strip(images, path: str) -> None:
    """The validation images side by side (one per held-out person), written atomically."""
    from PIL import Image

    from faceid.files import atomic_path

    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        strip.paste(im.convert("RGB"), (i * w, 0))
    with atomic_path(path) as tmp:
        strip.save(tmp, format="PNG")
