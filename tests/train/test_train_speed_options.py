"""The step's speed options (faceid/train/speed.py) change the speed, not the training: ``--compile``,
``--channels_last`` and ``--optimizer_impl`` runs of the tiny models against the plain run (same seed, same data).

``--compile`` is exercised with ``--compile_backend aot_eager``: the same graph capture (dynamo) and forward/backward
split (AOTAutograd) as the inductor the flag uses, without inductor's C++ code generation, which takes minutes on a
cold cache on these 2 cores (measured: 540 s for the tiny UNet + IdentityNet; 12 s warm; losses within 1e-6
relative of eager, docs/training.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest_train import make_index_dataset, tiny_args
from safetensors.torch import load_file

import train_instantId_sdxl as train
from faceid.train import speed
from faceid.train.errors import TrainingInputError
from ip_adapter.weights import read_adapter

LOSS_RTOL = 1e-4  # compiled / channels-last vs eager: the same math, kernels may sum in another order


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """``runs(name, *flags)``: 3 steps of the tiny models (a checkpoint at step 2), each run once per module."""
    root = tmp_path_factory.mktemp("speed")
    index = make_index_dataset(root / "data", n_people=3, per_person=2, singles=0)
    done = {}

    def get(name, *flags):
        if name not in done:
            out = root / name
            argv = tiny_args(tiny_dir, out, "--data_json_file", str(index), "--max_train_steps", "3",
                             "--checkpointing_steps", "2", "--cross_id", "--no-log_samples", *flags)  # fmt: skip
            res = train.main(train.parse_args(argv))
            log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
            done[name] = (res, out, [e["loss"] for e in log])
        return done[name]

    return get


def plain(runs):
    return runs("plain", "--optimizer_impl", "for-loop")  # what auto picks on the CPU


COMPILED = ("--optimizer_impl", "for-loop", "--compile", "--compile_backend", "aot_eager")


def weights(folder: Path) -> dict:
    image_proj, ip = read_adapter(folder / "ip-adapter.bin")
    cn = load_file(str(folder / "ControlNetModel" / "diffusion_pytorch_model.safetensors"))
    return {**{f"image_proj.{k}": v for k, v in image_proj.items()},
            **{f"ip_adapter.{k}": v for k, v in ip.items()}, **{f"controlnet.{k}": v for k, v in cn.items()}}  # fmt: skip


def test_compiled_steps_give_the_eager_losses(runs):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    res, _, losses = runs("compiled", *COMPILED)
    _, _, eager = plain(runs)
    # Both forwards were captured as graphs (a silent fall-back to eager would make the comparison empty), once:
    # a guard that fails every step (e.g. on a tensor's id()) would recompile every step.
    assert set(res.model.forwards) == {"unet", "controlnet"}
    assert all(isinstance(f, torch._dynamo.eval_frame.OptimizedModule) for f in res.model.forwards.values())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert len(losses) == 3 and len(set(losses)) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=LOSS_RTOL, atol=0)


def test_compiled_run_saves_the_modules_own_keys(runs):
    _, out, _ = runs("compiled", *COMPILED)
    _, ref, _ = plain(runs)
    for sub in ("checkpoint-2", "."):
        got, want = weights(out / sub), weights(ref / sub)
        assert sorted(got) == sorted(want) and not any("_orig_mod" in k for k in got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_channels_last_gives_the_eager_losses(runs):
    res, out, losses = runs("channels_last", "--optimizer_impl", "for-loop", "--channels_last")
    _, ref, eager = plain(runs)
    cl = torch.channels_last
    m = res.model
    assert m.unet.conv_in.weight.is_contiguous(memory_format=cl) and not m.unet.conv_in.weight.is_contiguous()
    assert m.controlnet.conv_in.weight.is_contiguous(memory_format=cl)
    assert res.parts["vae"].encoder.conv_in.weight.is_contiguous(memory_format=cl)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=LOSS_RTOL, atol=0)
    assert sorted(weights(out)) == sorted(weights(ref))  # NHWC weights are saved packed, under the same keys


def test_attention_compiles_once_for_new_tensors():
    """The attention processors under torch.compile: a new context tensor each step must not recompile (an id()
    of it in a cache key did, in the GPU check's step)."""
    from diffusers.models.attention_processor import Attention

    from ip_adapter.attention_processor import AttnProcessor

    attn = Attention(query_dim=8, cross_attention_dim=4, heads=2, dim_head=4, processor=AttnProcessor())
    compiled = torch.compile(attn, backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        x, context = torch.randn(1, 5, 8), torch.randn(1, 3, 4)
        torch.testing.assert_close(
            compiled(x, encoder_hidden_states=context), attn(x, encoder_hidden_states=context)
        )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_adamw_implementations_give_the_for_loop_weights():
    """Fused and foreach AdamW vs one tensor at a time, fp32, 3 steps of IdentityNet-like shapes with gradients
    over six orders of magnitude: the same weights to 1e-7 (the updates moved them by up to 3e-3)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(320, 4, 3, 3), (1280,), (64, 2048), (2, 7)]
    start = [torch.randn(s, generator=g) * 0.05 for s in shapes]
    grads = [[torch.randn(s, generator=g) * 10.0 ** -(6 * torch.rand(1, generator=g).item()) for s in shapes]
             for _ in range(3)]  # fmt: skip
    final = {}
    for impl in ("for-loop", "fused", "foreach"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **speed.adamw_kwargs(impl, params))
        assert speed.adamw_impl_name(opt) == impl
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
        final[impl] = [p.detach() for p in params]
    assert max((a - b).abs().max().item() for a, b in zip(final["for-loop"], start)) > 1e-3
    for impl in ("fused", "foreach"):
        for got, want in zip(final[impl], final["for-loop"]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_optimizer_impl_choice():
    from faceid.train.steps import make_optimizer

    assert speed.choose_adamw("auto", {"cuda"}) == {"fused": True}  # one kernel for all trained tensors
    assert speed.choose_adamw("auto", {"cpu"}) == speed.choose_adamw("auto", {"cuda", "cpu"}) == {}
    assert speed.choose_adamw("auto", {"cuda"}, floating=False) == {}
    with pytest.raises(TrainingInputError, match="no fused AdamW for meta"):
        speed.choose_adamw("fused", {"meta"})
    # The flag reaches the trainer's optimizer; auto on the CPU is PyTorch's default there, for-loop.
    params = [torch.nn.Parameter(torch.zeros(2, 3))]
    args = train.parse_args(["--data_json_file", "x"])
    for impl, want in (
        ("auto", "for-loop"),
        ("fused", "fused"),
        ("foreach", "foreach"),
        ("for-loop", "for-loop"),
    ):
        args.optimizer_impl = impl
        assert speed.adamw_impl_name(make_optimizer(args, params, 1, 1, 10)[0]) == want
    with pytest.raises(TrainingInputError, match="--use_8bit_adam"):
        train.check_args(train.parse_args(["--data_json_file", __file__, "--use_8bit_adam",
                                           "--optimizer_impl", "fused"]))  # fmt: skip
