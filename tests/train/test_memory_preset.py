"""The 24 GB preset (issue 23): the optimizer step applied during backward gives the update of the usual step,
bit for bit (torch AdamW and bitsandbytes AdamW8bit, LR schedule, checkpointed state); --max_grad_norm then clips
per parameter (its bound); the trainer with the preset's flags trains the same weights; the launcher's PRESET=24gb
passes them."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest_train import make_index_dataset, tiny_args

ROOT = Path(__file__).resolve().parents[2]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 80), torch.nn.LayerNorm(80),
        torch.nn.Linear(80, 4),
    )  # fmt: skip


def _batch(i):
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(i))


def _optimizers():
    import bitsandbytes as bnb

    return [torch.optim.AdamW, bnb.optim.AdamW8bit]


@pytest.mark.parametrize("cls", _optimizers(), ids=lambda c: c.__name__)
def test_in_backward_same_update_as_one_optimizer(cls):
    from diffusers.optimization import get_scheduler

    from faceid.train.in_backward import OptimizerInBackward

    kw = dict(lr=1e-2, weight_decay=1e-2)

    def standard_step(net, opt, sched, x):
        net(x).square().mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step(), sched.step(), opt.zero_grad()
        return norm

    def in_backward_step(net, opt, sched, x):
        net(x).square().mean().backward()
        assert all(p.grad is None for p in net.parameters())  # applied and freed during backward
        norm = opt.grad_norm()
        opt.step(), sched.step(), opt.zero_grad()
        return norm

    a, b = _net(), _net()
    oa, ob = cls(a.parameters(), **kw), OptimizerInBackward(cls, b.parameters(), max_grad_norm=10.0, **kw)
    sa, sb = (
        get_scheduler("cosine", optimizer=o, num_warmup_steps=2, num_training_steps=6) for o in (oa, ob)
    )
    for i in range(3):
        na, nb = standard_step(a, oa, sa, _batch(i)), in_backward_step(b, ob, sb, _batch(i))
        assert float(na) < 10.0  # global clipping does not trigger: the regime where both are exact
        assert abs(float(na) - float(nb)) <= 1e-6 * float(na)
    # A checkpoint of the in-backward state (as accelerate saves it, loaded weights_only) continues the same.
    buf = io.BytesIO()
    torch.save({"opt": ob.state_dict(), "sched": sb.state_dict(), "net": b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = _net()
    b.load_state_dict(saved["net"])
    ob = OptimizerInBackward(cls, b.parameters(), max_grad_norm=10.0, **kw)
    sb = get_scheduler("cosine", optimizer=ob, num_warmup_steps=2, num_training_steps=6)
    ob.load_state_dict(saved["opt"])
    sb.load_state_dict(saved["sched"])
    for i in range(3, 6):
        standard_step(a, oa, sa, _batch(i)), in_backward_step(b, ob, sb, _batch(i))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert [g["lr"] for g in ob.param_groups] == [oa.param_groups[0]["lr"]] * len(ob.param_groups)


def test_clipping_is_per_parameter_with_its_bound():
    """Above max_grad_norm each gradient is scaled by min(1, c/|g_i|) — never less than the global c/|g| — and the
    logged norm is still the global one."""
    from faceid.train.in_backward import OptimizerInBackward

    lr = 0.1
    ref, net = _net(), _net()
    loss = lambda m: m(_batch(0)).square().mean()  # noqa: E731
    loss(ref).backward()
    grads = [p.grad.clone() for p in ref.parameters()]
    total = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    c = sorted(float(g.norm()) for g in grads)[len(grads) // 2]  # half of the parameters above it
    opt = OptimizerInBackward(torch.optim.SGD, net.parameters(), max_grad_norm=c, lr=lr)
    loss(net).backward()
    assert abs(float(opt.grad_norm()) - total) <= 1e-6 * total and total > c
    clipped = 0
    for p0, p, g in zip(ref.parameters(), net.parameters(), grads, strict=True):
        factor = min(1.0, c / (float(g.norm()) + 1e-6))
        assert factor >= c / (total + 1e-6)
        clipped += factor < 1.0
        torch.testing.assert_close(p, p0 - lr * factor * g, rtol=0, atol=1e-7)
    assert 0 < clipped < len(grads)  # some parameters clipped, some not: the difference from global clipping


def test_in_backward_refuses_what_would_make_it_inexact(tmp_path):
    from accelerate import Accelerator

    import train_instantId_sdxl as train
    from faceid.train.errors import TrainingInputError
    from faceid.train.in_backward import OptimizerInBackward, in_backward_optimizer

    Accelerator(cpu=True)
    args = train.parse_args(["--optimizer_in_backward", "--output_dir", str(tmp_path)])
    with pytest.raises(TrainingInputError, match="gradient_accumulation_steps 2"):
        in_backward_optimizer(torch.optim.AdamW, args, accum=2, world=1)
    with pytest.raises(TrainingInputError, match="2 processes"):
        in_backward_optimizer(torch.optim.AdamW, args, accum=1, world=2)
    net = _net()
    opt = in_backward_optimizer(torch.optim.AdamW, args, accum=1, world=1)(net.parameters(), lr=1e-3)
    assert isinstance(opt, OptimizerInBackward)
    net(_batch(0)).sum().backward()
    with pytest.raises(RuntimeError, match="arrived twice"):
        net(_batch(1)).sum().backward()  # a second backward before the update is closed
    with pytest.raises(TrainingInputError, match="without --optimizer_in_backward"):
        opt.load_state_dict(torch.optim.AdamW(net.parameters()).state_dict())


def test_trainer_preset_flags_train_the_same_weights(tiny_dir, tmp_path):
    """Gradient checkpointing and bf16 autocast in both runs; the preset adds the optimizer in backward and no
    autocast weight cache: the exported weights are bit-identical, the logged gradient norms agree."""
    import train_instantId_sdxl as train
    from ip_adapter.weights import read_adapter

    data = make_index_dataset(tmp_path / "idx", n_people=2, per_person=2, singles=0)
    common = ["--data_json_file", str(data), "--max_train_steps", "2", "--gradient_checkpointing",
              "--mixed_precision", "bf16", "--no-log_samples"]  # fmt: skip
    runs = {}
    for name, extra in [("usual", []), ("preset", ["--optimizer_in_backward", "--no-autocast_cache"])]:
        out = tmp_path / name
        res = train.main(train.parse_args(tiny_args(tiny_dir, out, *common, *extra)))
        assert res.completed
        logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        image_proj, ip = read_adapter(out / "ip-adapter.bin")
        cn = {f"cn.{k}": v for k, v in res.model.controlnet.state_dict().items()}
        weights = {
            **{f"p.{k}": v for k, v in image_proj.items()},
            **{f"ip.{k}": v for k, v in ip.items()},
            **cn,
        }
        runs[name] = (weights, [e["grad_norm"] for e in logs])
    (w0, n0), (w1, n1) = runs["usual"], runs["preset"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert len(n0) == 2 and all(0 < a < 1.0 and abs(a - b) <= 1e-5 * a for a, b in zip(n0, n1, strict=True))
    # and the weights did change (the comparison is not between two untouched copies)
    start = read_adapter(Path(tiny_dir) / "checkpoints" / "ip-adapter.bin")[1]
    assert any(not torch.equal(v, w1[f"ip.{k}"]) for k, v in start.items())


def _launcher(**env):
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PRESET", "BATCH_SIZE", "MIXED_PRECISION", "NUM_GPUS")
    }
    return subprocess.run(
        ["bash", str(ROOT / "train_instantId_sdxl.sh"), "--max_train_steps", "3"],
        env={**e, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_launcher_preset_24gb_passes_its_flags():
    res = _launcher(PRESET="24gb")
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.splitlines()[-1].split()
    for flag in (
        "--gradient_checkpointing",
        "--use_8bit_adam",
        "--optimizer_in_backward",
        "--no-autocast_cache",
    ):
        assert cmd.count(flag) == 1, flag
    assert (
        cmd[cmd.index("--mixed_precision") + 1] == "bf16" and cmd[cmd.index("--train_batch_size") + 1] == "1"
    )
    assert cmd[-2:] == ["--max_train_steps", "3"]
    plain = _launcher().stdout.splitlines()[-1].split()
    assert "--optimizer_in_backward" not in plain and plain[plain.index("--mixed_precision") + 1] == "fp16"
    # the command is what the trainer accepts
    import train_instantId_sdxl as train

    args = train.parse_args(cmd[cmd.index("train_instantId_sdxl.py") + 1 :])
    assert args.optimizer_in_backward and args.use_8bit_adam and not args.autocast_cache
    for env in (
        dict(PRESET="24gb", MIXED_PRECISION="fp16"),
        dict(PRESET="24gb", NUM_GPUS="2"),
        dict(PRESET="x"),
    ):
        bad = _launcher(**env)
        assert bad.returncode == 2 and "PRESET=" in bad.stderr and bad.stdout.count("accelerate") == 0, env
