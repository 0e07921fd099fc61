"""--id_loss_weight: the differentiable alignment equals insightface's norm_crop, the torch-run recognizer equals
onnxruntime, zero weight changes nothing (bit-identical run), and the identity gradient reaches the trained modules
and none of the frozen ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest_train import make_index_dataset, tiny_args

import train_instantId_sdxl as train
from faceid.train.identity import IdentityLoss, Recognizer, align_faces, face_latent_box, similarity_transform

NO_DROPS = ["--text_drop_rate", "0", "--face_drop_rate", "0", "--both_drop_rate", "0"]


def smooth_image(h=240, w=200):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack(
        [128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 13), 128 + 60 * np.sin((xx + yy) / 20)], -1
    )


@pytest.mark.parametrize("kps", [
    [[70, 90], [130, 85], [100, 120], [75, 150], [128, 148]],      # near-frontal
    [[60, 120], [110, 70], [110, 120], [95, 170], [150, 130]],     # rotated ~45 degrees, off-centre
    [[5, 20], [40, 18], [22, 40], [8, 60], [38, 58]],              # small face at the border: zero padding
])  # fmt: skip
def test_alignment_matches_norm_crop(kps):
    from insightface.utils.face_align import estimate_norm, norm_crop

    kps = np.asarray(kps, np.float32)
    m = similarity_transform(kps)
    assert np.abs(m - estimate_norm(kps)).max() < 1e-4
    img = smooth_image()
    ours = align_faces(torch.from_numpy(img).permute(2, 0, 1)[None], [m])[0].permute(1, 2, 0).numpy()
    ref = norm_crop(img, kps)
    assert ours.shape == ref.shape == (112, 112, 3)
    assert np.abs(ours - ref).max() < 0.05  # cv2 interpolates with 1/32-pixel weights
    u8 = norm_crop(img.astype(np.uint8), kps).astype(np.float32)
    assert np.abs(ours - u8).mean() < 1.0
    # the decoded latent box covers every source pixel norm_crop reads
    y0, y1, x0, x1 = face_latent_box(kps, (240 // 8, 200 // 8), margin=0)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    pts = inv @ np.array([[0, 0, 1], [111, 0, 1], [0, 111, 1], [111, 111, 1]]).T
    inside = (pts[0] >= 0) & (pts[0] < 200) & (pts[1] >= 0) & (pts[1] < 240)
    assert (pts[0][inside] >= x0 * 8).all() and (pts[0][inside] <= x1 * 8).all()
    assert (pts[1][inside] >= y0 * 8).all() and (pts[1][inside] <= y1 * 8).all()


def test_recognizer_is_the_onnx_model(tiny_paths):
    import onnxruntime as ort

    path = tiny_paths["antelopev2"] / "glintr100.onnx"
    rec = Recognizer(path)
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    sess = ort.InferenceSession(str(path))
    want = sess.run(None, {sess.get_inputs()[0].name: (x - 127.5) / 127.5})[0]
    assert np.abs(rec(torch.from_numpy(x)).numpy() - want).max() < 1e-5
    assert not any(p.requires_grad for p in rec.parameters()) and not rec.train().training


def test_zero_weight_is_bit_identical_and_positive_weight_is_applied(tiny_dir, tiny_paths, tmp_path):
    index = make_index_dataset(tmp_path / "d")
    rec = str(tiny_paths["antelopev2"] / "glintr100.onnx")
    common = [
        "--data_json_file",
        str(index),
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "0",
        "--cross_id",
    ]
    runs = {
        "off": [],
        "zero": ["--id_loss_weight", "0", "--id_loss_recognizer", rec],
        "on": [
            "--id_loss_weight",
            "1",
            "--id_loss_max_timestep",
            "1000",
            "--id_loss_recognizer",
            rec,
            *NO_DROPS,
        ],
    }
    out = {}
    for name, extra in runs.items():
        res = train.main(train.parse_args(tiny_args(tiny_dir, tmp_path / name, *common, *extra)))
        log = [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        out[name] = (log, {k: v.detach().clone() for k, v in res.model.state_dict().items()})
    assert [e["loss"] for e in out["off"][0]] == [e["loss"] for e in out["zero"][0]]
    assert all(torch.equal(out["off"][1][k], out["zero"][1][k]) for k in out["off"][1])
    assert "id_loss" not in out["off"][0][0]
    on = out["on"][0]
    assert all(0.0 <= e["id_loss"] <= 2.0 for e in on)  # logged separately, a 1 - cosine
    assert on[0]["loss"] > out["off"][0][0]["loss"] + 0.5 * on[0]["id_loss"]  # added to the MSE


def test_identity_gradient_reaches_trained_modules_only(tiny_dir, tiny_paths, tmp_path):
    from faceid.train.dataset import FaceTrainDataset, collate
    from faceid.train.model import compute_loss, load_components, micro_generator
    from faceid.train.records import load_checked_records

    index = make_index_dataset(tmp_path / "d")
    args = train.parse_args(tiny_args(tiny_dir, tmp_path / "o", "--data_json_file", str(index), *NO_DROPS,
                                      "--id_loss_weight", "1", "--id_loss_max_timestep", "1000",
                                      "--id_loss_recognizer", str(tiny_paths["antelopev2"] / "glintr100.onnx")))  # fmt: skip
    parts = load_components(args, torch.float32, "cpu")
    parts["id_loss"] = IdentityLoss(args.id_loss_recognizer, args.id_loss_max_timestep)
    records, _ = load_checked_records(str(index))
    ds = FaceTrainDataset(records, (parts["tokenizer"], parts["tokenizer_2"]), resolution=64, text_drop=0,
                          face_drop=0, both_drop=0)  # fmt: skip
    batch = collate([ds[0], ds[3]])
    model = parts["model"]

    def grads(weight):
        model.zero_grad(set_to_none=True)
        args.id_loss_weight = weight
        stats = {}
        compute_loss(
            batch, parts, args, micro_generator(7, 0, 0, "cpu"), torch.float32, stats=stats
        ).backward()
        return stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stats, with_id = grads(1.0)
    assert stats["id_count"] == 2 and 0 < float(stats["id_loss"]) < 2
    _, mse_only = grads(0.0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(with_id) == set(mse_only) == trained  # no frozen UNet weight gets a gradient
    diff = {n: (with_id[n] - mse_only[n]).abs().max().item() for n in trained}
    for prefix in ("image_proj.", "controlnet.", "unet."):  # Resampler, IdentityNet, IP layers
        assert max(v for n, v in diff.items() if n.startswith(prefix)) > 0, prefix
    frozen = [*parts["vae"].parameters(), *parts["text_encoder"].parameters(), *parts["id_loss"].recognizer.parameters(),
              *parts["id_loss"].recognizer.buffers()]  # fmt: skip
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    # above the timestep threshold nothing is applied
    parts["id_loss"].max_timestep = 0
    stats, _ = grads(1.0)
    assert "id_loss" not in stats
