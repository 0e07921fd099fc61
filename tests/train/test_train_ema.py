"""--use_ema: the exported weights are the EMA formula applied to the logged (checkpointed) updates, and a killed
run resumed from a checkpoint continues the same average."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest_train import make_index_dataset, tiny_args
from safetensors.torch import load_file

import train_instantId_sdxl as train
from faceid.train.config import TrainHooks
from ip_adapter.weights import read_adapter


def weights(folder: Path) -> dict:
    image_proj, ip = read_adapter(folder / "ip-adapter.bin")
    cn = load_file(str(folder / "ControlNetModel" / "diffusion_pytorch_model.safetensors"))
    return {**{f"p.{k}": v for k, v in image_proj.items()}, **{f"ip.{k}": v for k, v in ip.items()},
            **{f"cn.{k}": v for k, v in cn.items()}}  # fmt: skip


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_ema_export_is_the_formula_and_resume_continues_it(tiny_dir, tmp_path):
    data = make_index_dataset(tmp_path / "d")
    decay = 0.6
    common = ["--data_json_file", str(data), "--max_train_steps", "4", "--checkpointing_steps", "1",
              "--use_ema", "--ema_decay", str(decay), "--cross_id"]  # fmt: skip
    out = tmp_path / "straight"
    train.main(train.parse_args(tiny_args(tiny_dir, out, *common)))
    # The logged updates: every checkpoint holds the raw trained weights after that step.
    ema = weights(tiny_dir / "checkpoints")
    for step in range(1, 5):
        raw = weights(out / f"checkpoint-{step}")
        ema = {k: decay * ema[k].float() + (1 - decay) * raw[k].float() for k in ema}
        saved = load_file(str(out / f"checkpoint-{step}" / "ema.safetensors"))
        assert len(saved) == sum(1 for k in raw)  # one shadow per trained tensor
    final = weights(out)
    assert max_diff(final, ema) < 1e-6
    assert (
        max_diff(final, weights(out / "checkpoint-4")) > 1e-5
    )  # the export is the average, not the last step

    parted = tmp_path / "parted"
    res = train.main(
        train.parse_args(tiny_args(tiny_dir, parted, *common)), hooks=TrainHooks(stop_after_steps=2)
    )
    assert not res.completed
    train.main(train.parse_args(tiny_args(tiny_dir, parted, *common, "--resume_from_checkpoint", "latest")))
    assert max_diff(weights(parted), final) < 1e-6
    for k, v in load_file(str(parted / "checkpoint-4" / "ema.safetensors")).items():
        torch.testing.assert_close(
            v, load_file(str(out / "checkpoint-4" / "ema.safetensors"))[k], atol=1e-6, rtol=0
        )
