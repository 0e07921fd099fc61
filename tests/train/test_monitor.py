"""Training that reports identity while it runs (issue 21): the identity / copy-paste metrics, the held-out split,
the collapse probe and its warning on a run that collapses, and the run report. The healthy 600-step run's
curves are asserted in tests/train/test_learns_identity.py (the same training, no extra one)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from faceid.eval.identity import identity_scores, mean_scores
from faceid.tiny import claims as C
from faceid.tiny import world as W
from faceid.train import monitor as M

PERSONS = list(range(8))
COLLAPSE_LR = "1e-2"  # docs/miniature.md: the Resampler's tokens collapse within 100 steps at this rate
COLLAPSE_STEPS = 25


# ------------------------------------------------------------------------------------------------ metrics


def test_identity_and_copy_rank_known_images(tiny_paths):
    """Truth known: a pixel copy of the reference, another photo of the same person, a photo of another person.
    Identity (same) ranks the two same-person images above the other person; only the paste copies."""
    rec = C.Recognizer(tiny_paths["antelopev2"])
    rng = np.random.default_rng(7)
    codes = W.person_codes()
    photos = [
        W.random_photo(rng, p) for p in (3, 3, 3, 3, 3, 5, 5)
    ]  # ref, others×3, new photo of 3; person 5
    images = np.stack([W.render(p, codes, seed=i) for i, p in enumerate(photos)])
    emb = rec.embed(images, [W.box_kps(p.box) for p in photos])
    ref, others, fresh, diff = emb[0], emb[1:4], emb[4], emb[5:]
    paste = identity_scores(ref, ref, others, diff)
    same_person = identity_scores(fresh, ref, others, diff)
    other_person = identity_scores(diff[0], ref, others, diff[1:])
    assert paste["ref_sim"] == pytest.approx(1.0)
    assert paste["copy"] == pytest.approx(1.0 - paste["same"])  # the definition, independently
    assert paste["copy"] > same_person["copy"] + 0.01
    assert abs(same_person["copy"]) < 0.1
    assert same_person["same"] > 0.8 and same_person["margin"] > 0.5
    assert other_person["same"] < same_person["same"] - 0.5 and other_person["margin"] < 0
    means = mean_scores([paste, same_person])
    assert means["same"] == pytest.approx((paste["same"] + same_person["same"]) / 2)


def test_token_spread_is_mean_pairwise_rms_distance():
    tokens = torch.randn(4, 3, 5)
    want = np.mean(
        [np.sqrt(((tokens[i] - tokens[j]) ** 2).sum(-1).mean()) for i in range(4) for j in range(4) if i != j]
    )
    assert M.token_spread(tokens) == pytest.approx(float(want), rel=1e-5)
    assert M.token_spread(tokens[:1].repeat(4, 1, 1)) == pytest.approx(0.0, abs=1e-6)


def test_collapse_alarm_warns_once_on_spread_or_zero_gap():
    alarm = M.CollapseAlarm()
    healthy = [(0, 0.22, -0.004), (25, 0.27, 0.0004), (50, 0.30, 0.013), (75, 0.31, 0.034)]
    assert [alarm.check(*v) for v in healthy] == [None] * 4
    alarm = M.CollapseAlarm()
    seq = [alarm.check(*v) for v in [(0, 0.22, -0.004), (25, 0.0, 0.0), (50, 0.0, 0.0)]]
    assert seq[0] is None and "spread" in seq[1] and "--learning_rate" in seq[1] and seq[2] is None
    alarm = M.CollapseAlarm()  # spread kept, the face never used: the gap stays at zero
    seq = [alarm.check(s, 0.2, 1e-5) for s in (0, 25, 50, 75, 100)]
    assert seq[:3] == [None, None, None] and "loss gap" in seq[3] and seq[4] is None


# ------------------------------------------------------------------------------------------------ held-out split


def _records(n_persons=6, per=3, singles=2):
    from faceid.train.records import Record

    recs = [
        Record(f"{p}-{k}", f"{p}-{k}.png", person_id=f"p{p}") for p in range(n_persons) for k in range(per)
    ]
    return recs + [Record(f"s{i}", f"s{i}.png", person_id=f"single{i}") for i in range(singles)]


def test_split_persons_holds_out_whole_persons_deterministically():
    from faceid.train.errors import TrainingInputError

    recs = _records()
    train, held = M.split_persons(recs, 2, seed=0)
    held_ids = {r.person_id for r in held}
    assert len(held_ids) == 2 and len(held) == 6 and len(train) + len(held) == len(recs)
    assert not held_ids & {r.person_id for r in train}
    assert not any(p.startswith("single") for p in held_ids)  # a reference and other photos each
    assert [r.key for r in M.split_persons(recs, 2, seed=0)[1]] == [r.key for r in held]
    chosen = {frozenset(r.person_id for r in M.split_persons(recs, 2, seed=s)[1]) for s in range(6)}
    assert len(chosen) > 1  # the seed picks the persons, not the index order
    persons = M.group_persons(held)
    assert [len(p.others) for p in persons] == [2, 2] and persons[0].reference.key.endswith("-0")
    with pytest.raises(TrainingInputError, match="--validation_persons 7"):
        M.split_persons(recs, 7)


# ------------------------------------------------------------------------------------------------ a collapsing run


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def collapsed(tiny_paths, tmp_path_factory):
    """25 steps at lr 1e-2 on the miniature (8 persons × 4 photos, 2 held out for validation), probed at 0 and
    25, validated at 0 and 25 (2 sampling steps): the Resampler collapses."""
    import train_instantId_sdxl as t

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("collapse")
    data = C.write_world_dataset(root / "data", PERSONS, 4, C.Recognizer(tiny_paths["antelopev2"]), seed=1)
    out = root / "out"
    argv = C.train_args(tiny_paths, data, out, COLLAPSE_STEPS, 0, *C.IDENTITY_FLAGS)
    argv += ["--learning_rate", COLLAPSE_LR, "--collapse_check_steps", str(COLLAPSE_STEPS), "--cache_latents",
             "--validation_persons", "2", "--validation_steps", str(COLLAPSE_STEPS), "--validation_steps_count", "2",
             "--validation_face_model", str(tiny_paths["antelopev2"]), "--num_validation_faces", "0"]  # fmt: skip
    cap = _Capture()
    logging.getLogger("train_instantid").addHandler(cap)
    try:
        t.main(t.parse_args(argv))
    finally:
        logging.getLogger("train_instantid").removeHandler(cap)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return dict(out=out, rows=rows, warnings=cap.messages, data=data)


def test_collapsing_run_warns_once(collapsed):
    probes = {r["step"]: r for r in collapsed["rows"] if "token_spread" in r}
    assert sorted(probes) == [0, COLLAPSE_STEPS]
    assert probes[COLLAPSE_STEPS]["token_spread"] < M.SPREAD_FRACTION * probes[0]["token_spread"]
    assert abs(probes[COLLAPSE_STEPS]["loss_gap"]) < M.GAP_ZERO
    assert probes[COLLAPSE_STEPS].get("collapse_warning") == 1.0 and "collapse_warning" not in probes[0]
    warned = [m for m in collapsed["warnings"] if "Resampler is collapsing" in m]
    assert len(warned) == 1 and f"step {COLLAPSE_STEPS}:" in warned[0] and "text_drop_zeros" in warned[0]


def test_validation_scores_held_out_persons(collapsed):
    """--validation_persons 2: two persons are out of training, and each validation logs their scores."""
    samples = collapsed["out"] / "train_args.json"
    assert json.loads(samples.read_text())["validation_persons"] == 2
    vals = {r["step"]: r for r in collapsed["rows"] if "val_same" in r}
    assert sorted(vals) == [0, COLLAPSE_STEPS]
    for r in vals.values():
        assert r["val_margin"] == pytest.approx(r["val_same"] - r["val_different"])
        assert r["val_copy"] == pytest.approx(r["val_ref_sim"] - r["val_same"])
        assert 0.0 <= r["val_face_found"] <= 1.0 and r["val_seconds"] > 0
    strip = Image.open(collapsed["out"] / "validation" / f"identity-{COLLAPSE_STEPS:07d}.png")
    assert strip.size == (2 * W.IMAGE_SIZE, W.IMAGE_SIZE)


def test_held_out_persons_are_not_trained_on(tiny_paths, tmp_path):
    import train_instantId_sdxl as t
    from faceid.train.config import build_data
    from faceid.train.records import load_checked_records

    data = C.write_world_dataset(tmp_path / "d", PERSONS, 2, C.Recognizer(tiny_paths["antelopev2"]), seed=3)
    args = t.parse_args(C.train_args(tiny_paths, data, tmp_path / "o", 1, 0, "--validation_persons", "3",
                                     "--validation_steps", "10"))  # fmt: skip
    data_ = build_data(args, (), 0, 1, logging.getLogger("test"))
    ds, records = data_.dataset, data_.records
    everyone, _ = load_checked_records(str(data.index))
    held = {r.person_id for r in ds.held_out}
    assert len(held) == 3 and not held & {r.person_id for r in records}
    assert len(records) + len(ds.held_out) == len(everyone)
    assert [r.key for r in ds.held_out] == [r.key for r in M.split_persons(everyone, 3, seed=0)[1]]


# ------------------------------------------------------------------------------------------------ the report


def test_report_of_a_finished_run(collapsed, tmp_path):
    import report_run

    report_run.main(report_run.parse_args([str(collapsed["out"]), "--out", str(tmp_path)]))
    png = Image.open(tmp_path / "report.png")
    assert png.format == "PNG" and png.size[0] > 800
    md = (tmp_path / "report.md").read_text()
    assert f"collapse warned at step {COLLAPSE_STEPS}" in md and "![curves](report.png)" in md
    spread = [r["token_spread"] for r in collapsed["rows"] if "token_spread" in r]
    assert f"| face-token spread | {spread[0]:.4g} | {spread[-1]:.4g} |" in md
    assert "| Face Sim, same person (steps 0→25)" in md
