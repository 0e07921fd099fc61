"""train_instantId_sdxl.py end to end on the tiny models: each data format, what trains and what stays frozen,
checkpoints that inference loads, exact resume, ``latest``, partial checkpoints, pruning, bad data, validation,
non-finite losses and a 2-process (gloo) run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_train import (
    env_offline,
    make_faceid6m_dataset,
    make_index_dataset,
    make_index_with_missing_image,
    make_mfacetech_dataset,
    make_seed_dataset,
    tiny_args,
)
from safetensors.torch import load_file

import train_instantId_sdxl as train
from faceid.train import checkpoints as ckpt
from faceid.train.config import TrainHooks
from faceid.train.records import BadDataError
from ip_adapter.weights import read_adapter

ROOT = Path(__file__).resolve().parents[2]


def run(tiny, out, *extra, hooks=None):
    return train.main(train.parse_args(tiny_args(tiny, out, *extra)), hooks=hooks)


def adapter(path):
    image_proj, ip = read_adapter(path)
    return {**{f"p.{k}": v for k, v in image_proj.items()}, **{f"ip.{k}": v for k, v in ip.items()}}


def controlnet(folder):
    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def index_data(tmp_path_factory):
    return make_index_dataset(tmp_path_factory.mktemp("idx"), n_people=3, per_person=2, singles=1)


def test_train_index_changes_trained_keeps_frozen_and_inference_loads(tiny_dir, index_data, tmp_path):
    from diffusers import UNet2DConditionModel

    tiny = tiny_dir
    out = tmp_path / "out"
    res = run(tiny, out, "--data_json_file", str(index_data), "--max_train_steps", "3",
              "--checkpointing_steps", "2", "--cross_id", "--validation_steps", "3",
              "--validation_steps_count", "2", "--num_validation_faces", "1", "--validation_prompt", "a person")  # fmt: skip
    assert res.completed and res.global_step == 3
    # trained tensors changed: every one of them (an IP layer left out of the optimizer would keep its weights)
    new, old = adapter(out / "ip-adapter.bin"), adapter(tiny / "checkpoints" / "ip-adapter.bin")
    assert new.keys() == old.keys() and any(k.startswith("ip.") for k in new)
    assert [k for k in new if torch.equal(new[k], old[k])] == []
    assert (
        max_diff(controlnet(out / "ControlNetModel"), controlnet(tiny / "checkpoints" / "ControlNetModel"))
        > 0
    )
    # frozen UNet weights unchanged (IP layers aside)
    fresh = UNet2DConditionModel.from_pretrained(tiny / "stable-diffusion-xl-base-1.0", subfolder="unet")
    trained = res.model.unet.state_dict()
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0)
    te = res.parts["text_encoder"].state_dict()
    from transformers import CLIPTextModel

    for k, v in (
        CLIPTextModel.from_pretrained(tiny / "stable-diffusion-xl-base-1.0", subfolder="text_encoder")
        .state_dict()
        .items()
    ):
        torch.testing.assert_close(te[k], v, rtol=0, atol=0)
    # checkpoint layout, both adapter formats agree
    c2 = out / "checkpoint-2"
    assert (c2 / ckpt.STATE_FILE).is_file() and (c2 / "ControlNetModel" / "config.json").is_file()
    assert max_diff(adapter(c2 / "ip-adapter.bin"), adapter(c2 / "ip-adapter.safetensors")) == 0
    assert (out / "validation" / "step-0000003.png").is_file()
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "data_time", "step_time", "samples_per_sec"} <= set(log[0])

    # the pipeline and infer_from_pkl load the result
    import infer_from_pkl
    from faceid.face.face_info import save_face_info
    from faceid.face.kps import draw_kps
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    pipe = load_pipeline(
        tiny / "stable-diffusion-xl-base-1.0", out / "ControlNetModel", out / "ip-adapter.bin", device="cpu"
    )
    kps = np.array([[20, 24], [44, 24], [32, 34], [22, 46], [42, 46]], np.float32)
    img = pipe(
        "a person",
        image_embeds=np.ones(512, np.float32),
        image=draw_kps((64, 64), kps),
        num_inference_steps=2,
    ).images[0]
    assert img.size == (64, 64)
    pipe.load_ip_adapter_instantid(str(c2 / "ip-adapter.safetensors"))
    from PIL import Image

    face = tmp_path / "face.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(face)
    save_face_info(
        tmp_path / "face.npz",
        {"embedding": np.ones(512, np.float32), "kps": kps, "frame": np.array([64, 64])},
    )
    argv = ["--base_model", str(tiny / "stable-diffusion-xl-base-1.0"), "--controlnet", str(out / "ControlNetModel"),
            "--face_adapter", str(out / "ip-adapter.bin"), "--face_image", str(face), "--face_info",
            str(tmp_path / "face.npz"), "--prompt", "a person", "--steps", "2", "--min_side", "64", "--max_side",
            "64", "--output_dir", str(tmp_path / "infer"), "--device", "cpu"]  # fmt: skip
    infer_from_pkl.main(infer_from_pkl.parse_args(argv))
    assert list((tmp_path / "infer").glob("00_*.png"))


@pytest.mark.parametrize("fmt", ["mfacetech", "seed", "faceid6m", "shards"])
def test_train_other_formats_fresh_models_and_flags(tiny_dir, tmp_path, fmt):
    tiny = tiny_dir
    extra = []
    if fmt == "mfacetech":
        data = ["--data_json_file", str(make_mfacetech_dataset(tmp_path / "d"))]
        # fresh adapter (k/v from the UNet) and IdentityNet from the UNet; IdentityNet frozen
        extra = ["--no-train_identitynet", "--resampler_dim", "32", "--resampler_depth", "1", "--resampler_heads", "2",
                 "--resampler_dim_head", "16", "--num_tokens", "4", "--resampler_ff_mult", "1"]  # fmt: skip
    elif fmt == "seed":
        data = ["--data_json_file", str(make_seed_dataset(tmp_path / "d")), "--aspect_ratio_buckets", "--random_flip", "0.5",
                "--no-train_resampler", "--snr_gamma", "5", "--noise_offset", "0.05", "--gradient_accumulation_steps", "2"]  # fmt: skip
    elif fmt == "faceid6m":
        data = ["--train_data_dir", str(make_faceid6m_dataset(tmp_path / "d")), "--cache_latents",
                "--cache_text_embeddings", "--num_train_epochs", "2", "--dataloader_num_workers", "1"]  # fmt: skip
    else:
        from faceid.train.records import load_checked_records
        from faceid.train.webdataset_shards import write_shards

        records, _ = load_checked_records(str(make_index_dataset(tmp_path / "d")))
        write_shards(records, tmp_path / "shards", samples_per_shard=3)
        data = ["--train_shards", str(tmp_path / "shards"), "--cross_id", "--random_crop",
                "--mixed_precision", "bf16", "--gradient_checkpointing"]  # fmt: skip
    out = tmp_path / "out"
    if fmt == "mfacetech":
        args = tiny_args(tiny, out, *data, *extra, "--max_train_steps", "2")
        args = [
            a
            for a in args
            if a not in (str(tiny / "checkpoints" / "ip-adapter.bin"), "--pretrained_ip_adapter_path")
        ]
        args = [
            a
            for a in args
            if a not in (str(tiny / "checkpoints" / "ControlNetModel"), "--controlnet_model_name_or_path")
        ]
        res = train.main(train.parse_args(args))
    else:
        res = run(
            tiny, out, *data, *extra, *([] if "--num_train_epochs" in data else ["--max_train_steps", "2"])
        )
    assert res.completed
    image_proj, ip = read_adapter(out / "ip-adapter.bin")
    base_proj, base_ip = read_adapter(tiny / "checkpoints" / "ip-adapter.bin")
    if fmt == "mfacetech":
        assert image_proj["latents"].shape == (1, 4, 32)
        assert controlnet(out / "ControlNetModel").keys()  # written, initialised from the UNet
    elif fmt == "seed":
        assert max_diff(image_proj, base_proj) == 0  # Resampler frozen
        assert max_diff(ip, base_ip) > 0
    else:
        assert max_diff(ip, base_ip) > 0
    if fmt == "faceid6m":
        assert res.global_step == 4  # 2 epochs x 2 batches
    if fmt == "shards":  # bf16: frozen UNet in bf16, everything trained kept in fp32
        m = res.model
        assert m.unet.conv_in.weight.dtype == torch.bfloat16
        assert m.controlnet.conv_in.weight.dtype == m.image_proj.proj_in.weight.dtype == torch.float32
        assert all(p.dtype == torch.float32 for n, p in m.unet.named_parameters() if "_ip." in n)


def test_exact_resume_latest_partial_and_pruning(tiny_dir, index_data, tmp_path):
    tiny = tiny_dir
    common = ["--data_json_file", str(index_data), "--max_train_steps", "6", "--checkpointing_steps", "2",
              "--cross_id", "--random_crop", "--random_flip", "0.5", "--lr_scheduler", "cosine",
              "--lr_warmup_steps", "2", "--dataloader_num_workers", "1"]  # fmt: skip
    straight = tmp_path / "straight"
    run(tiny, straight, *common)
    parted = tmp_path / "parted"
    # killed after step 3: checkpoint-2 is complete; a crash mid-way through checkpoint-4 leaves a partial
    res = run(tiny, parted, *common, "--checkpoints_total_limit", "2", hooks=TrainHooks(stop_after_steps=3))
    assert not res.completed and not (parted / "ip-adapter.bin").exists()
    (parted / ".checkpoint-4.partial").mkdir()
    (parted / "checkpoint-5").mkdir()  # no trainer_state.json: not complete
    assert ckpt.resolve_resume(parted, "latest") == parted / "checkpoint-2"
    run(tiny, parted, *common, "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest")
    assert max_diff(adapter(straight / "ip-adapter.bin"), adapter(parted / "ip-adapter.bin")) < 1e-6
    assert max_diff(controlnet(straight / "ControlNetModel"), controlnet(parted / "ControlNetModel")) < 1e-6

    # same sample sequence (the resumed run re-does step 3: keep the last record per step)
    def samples(d):
        entries = {}
        for line in (d / "samples" / "rank-0.jsonl").read_text().splitlines():
            e = json.loads(line)
            entries[e["step"]] = (e["batches"], e["loss"])
        return entries

    a, b = samples(straight), samples(parted)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s][0] == b[s][0]
        assert abs(a[s][1] - b[s][1]) < 1e-6
    names = sorted(p.name for p in parted.glob("checkpoint-*") if (p / ckpt.STATE_FILE).exists())
    assert names == ["checkpoint-4", "checkpoint-6"]  # total limit 2 pruned checkpoint-2
    assert ckpt.resolve_resume(parted, "latest") == parted / "checkpoint-6"
    # resuming a finished run is a no-op that still exports
    res = run(tiny, parted, *common, "--resume_from_checkpoint", str(parted / "checkpoint-6"))
    assert res.global_step == 6


def test_skip_bad_samples_trains_on_the_rest(tiny_dir, tmp_path):
    path, n_lines = make_index_with_missing_image(tmp_path / "d")
    with pytest.raises(BadDataError, match="gone.png"):
        run(tiny_dir, tmp_path / "o1", "--data_json_file", str(path), "--max_train_steps", "1")
    run(
        tiny_dir,
        tmp_path / "o2",
        "--data_json_file",
        str(path),
        "--max_train_steps",
        "3",
        "--skip_bad_samples",
    )
    seen = set()
    for line in (tmp_path / "o2" / "samples" / "rank-0.jsonl").read_text().splitlines():
        for b in json.loads(line)["batches"]:
            seen.update(b["index"])
    assert seen and max(seen) < n_lines - 1  # indices into the 6 good records


def test_nonfinite_loss_skips_then_stops(tiny_dir, index_data, tmp_path):
    import faceid.train.model as training

    real = training.compute_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] in (2,) or calls["n"] >= 4 else loss

    with pytest.raises(RuntimeError, match="non-finite"):
        run(tiny_dir, tmp_path / "o", "--data_json_file", str(index_data), "--max_train_steps", "8",
            "--max_nonfinite_steps", "3", hooks=TrainHooks(compute_loss=flaky))  # fmt: skip
    log = [json.loads(x)["step"] for x in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 3]


def test_two_processes_gloo(tiny_dir, index_data, tmp_path):
    out = tmp_path / "mp"
    args = tiny_args(tiny_dir, out, "--data_json_file", str(index_data), "--max_train_steps", "3",
                     "--checkpointing_steps", "2", "--cross_id")  # fmt: skip
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(ROOT / "train_instantId_sdxl.py"),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_offline(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == [
        "checkpoint-2"
    ]
    assert {p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]  # logged once, by the main process
    ranks = [
        [json.loads(x) for x in (out / "samples" / f"rank-{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    for step in range(3):
        assert abs(log[step]["loss"] - (ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2) < 1e-5
        a = set(ranks[0][step]["batches"][0]["index"])
        b = set(ranks[1][step]["batches"][0]["index"])
        assert a != b
    assert (out / "ip-adapter.bin").is_file() and (out / "ControlNetModel" / "config.json").is_file()


def test_user_errors_print_what_to_do_and_exit_2_without_traceback(tiny_dir, tmp_path, capsys):
    from faceid.train.errors import run_cli

    path, _ = make_index_with_missing_image(tmp_path / "d")
    argv = tiny_args(tiny_dir, tmp_path / "o", "--data_json_file", str(path), "--max_train_steps", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "train_instantId_sdxl.py"), *argv], cwd=tmp_path,
                          env=env_offline(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 2
    assert "gone.png" in proc.stderr and "--skip_bad_samples" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    # A missing index and a wrong flag combination: the same clean exit, in-process.
    cases = {
        "no such file": ["--data_json_file", str(tmp_path / "nope.jsonl")],
        "exactly one of": ["--data_json_file", str(path), "--train_shards", str(tmp_path)],
        "deterministic view": ["--data_json_file", str(path), "--cache_latents", "--random_crop"],
        "not a complete checkpoint": [
            "--data_json_file",
            str(path),
            "--resume_from_checkpoint",
            "checkpoint-9",
        ],
    }
    for needle, extra in cases.items():
        capsys.readouterr()
        assert run_cli(train.main, train.parse_args, tiny_args(tiny_dir, tmp_path / "o2", *extra)) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
