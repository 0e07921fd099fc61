"""Training teaches the model to use the face (issue 11), on the miniature world: after a short
``train_instantId_sdxl.py --cross_id`` run (adapter only), images generated with a held-out photo's embedding are
closer to that person (tiny recognizer, Face Sim) than before training and than to another person. A deliberately
broken trainer (face embeddings shuffled across the batch) must not get there: the test tells a working trainer
from a broken one."""

from __future__ import annotations

import pytest

from faceid.tiny import claims as C

PERSONS = list(range(8))
SEED = 0
# Measured with the recognizer that leaks glasses and expression (issue 20), seed 0: working trainer rise +0.18 and
# +0.30 over the other person; shuffled faces rise +0.05 (+0.14 over the other person).
MARGIN = 0.12
# The other broken trainer of the benchmark, the IP layers left out of the optimizer, is not a case for this bar any
# more: with the leaking recognizer the Resampler alone teaches the person through IdentityNet (rise +0.15, +0.29 over
# the other person at 600 steps, vs +0.18 / +0.30 working; it was +0.05 before the leak). That the IP layers train
# is checked on their weights (tests/train/test_train_run.py::test_train_index_changes_trained_keeps_frozen...).
BROKEN = ("shuffle",)


def _train(argv, hooks=None):
    import train_instantId_sdxl as t

    return t.main(t.parse_args(argv), hooks=hooks)


def _pipe(paths, out=None):
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    return C.pipe_for(load_pipeline, paths, out)


@pytest.fixture(scope="module")
def world(tiny_paths, tmp_path_factory):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    rec = C.Recognizer(tiny_paths["antelopev2"])
    data = C.write_world_dataset(tmp_path_factory.mktemp("world"), PERSONS, 4, rec, seed=1)
    refs, _, ref_emb = C.references(PERSONS, rec, seed=2)
    before = C.identity_scores(_pipe(tiny_paths), rec, refs, ref_emb, SEED)
    return dict(rec=rec, data=data, refs=refs, emb=ref_emb, before=before)


def _after(tiny_paths, world, out, kind=None, extra=()):
    argv = C.train_args(tiny_paths, world["data"], out, C.IDENTITY_STEPS, SEED, *C.IDENTITY_FLAGS, *extra)
    _train(argv, hooks=C.broken_trainer(kind))
    return C.identity_scores(_pipe(tiny_paths, out), world["rec"], world["refs"], world["emb"], SEED)


def _margins(world, after):
    return after["same"] - world["before"]["same"], after["same"] - after["different"]


# Issue 21: the working run also monitors itself (no extra training): identity validation at the start and the end
# on fresh photos of the trained persons (at 600 steps the miniature does not generalise to unseen persons,
# docs/miniature.md) and the collapse probe every 100 steps. Neither touches the training's random numbers.
VALIDATION_STEPS, PROBE_STEPS = C.IDENTITY_STEPS, 100
# Measured here (validation photos seed 4): same-person Face Sim +0.06 at step 0, +0.19 at 600 (rise +0.13); different
# person -0.03 at 600 (margin +0.22); token spread 0.22 -> 0.66.
VAL_MARGIN = 0.08


@pytest.fixture(scope="module")
def working(tiny_paths, world, tmp_path_factory):
    import json
    import logging

    root = tmp_path_factory.mktemp("ok")
    val = C.write_world_dataset(root / "val", PERSONS, 3, world["rec"], seed=4)
    flags = ("--validation_index", str(val.index), "--validation_steps", str(VALIDATION_STEPS),
             "--validation_steps_count", str(C.GEN_STEPS), "--num_validation_faces", "0",
             "--validation_face_model", str(tiny_paths["antelopev2"]), "--collapse_check_steps", str(PROBE_STEPS))  # fmt: skip
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("train_instantid").addHandler(handler)
    try:
        after = _after(tiny_paths, world, root / "out", extra=flags)
    finally:
        logging.getLogger("train_instantid").removeHandler(handler)
    rows = [json.loads(line) for line in (root / "out" / "train_log.jsonl").read_text().splitlines()]
    return dict(after=after, rows=rows, warnings=warnings)


def test_training_learns_identity(world, working):
    after = working["after"]
    rise, sep = _margins(world, after)
    assert after["face_found"] == 1.0, after
    assert rise > MARGIN and sep > MARGIN, (world["before"]["same"], after)


def test_monitor_logs_identity_rising_and_spread_kept(working):
    """From train_log.jsonl alone: validation Face Sim same-person rises above different-person; the face-token
    spread stays up and the collapse warning never fires."""
    val = {r["step"]: r for r in working["rows"] if "val_same" in r}
    assert sorted(val) == list(range(0, C.IDENTITY_STEPS + 1, VALIDATION_STEPS))
    first, last = val[0], val[C.IDENTITY_STEPS]
    assert last["val_same"] - first["val_same"] > VAL_MARGIN, val
    assert last["val_same"] - last["val_different"] > VAL_MARGIN, val
    spread = [r["token_spread"] for r in working["rows"] if "token_spread" in r]
    assert len(spread) == C.IDENTITY_STEPS // PROBE_STEPS + 1
    assert min(spread[1:]) > 0.5 * spread[0] and spread[-1] > spread[0], spread
    assert not any(r.get("collapse_warning") for r in working["rows"])
    assert not any("collapsing" in m for m in working["warnings"])


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_trainer_does_not_learn_identity(tiny_paths, world, tmp_path, kind):
    after = _after(tiny_paths, world, tmp_path / kind, kind)
    rise, sep = _margins(world, after)
    assert not (rise > MARGIN and sep > MARGIN), (kind, world["before"]["same"], after)
