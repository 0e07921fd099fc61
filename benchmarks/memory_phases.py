"""The measuring half of ``bench_memory.py``: resident memory from /proc, and each phase (run in its own process by
``bench_memory.py --phase NAME``) as a function returning its figures. The report (plan, sums, tables) stays in
``bench_memory.py``."""

from __future__ import annotations

import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # faceid (the preset's optimizer)

GIB = 1024**3
CHUNK_PARAMS = 350_000_000


# ---- measuring -----------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    """Bytes of ``VmRSS`` / ``VmHWM`` / ``VmSize`` of this process."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def rss() -> int:
    gc.collect()
    return _status("VmRSS")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak() -> int:
    return _status("VmHWM")


def limit_address_space(budget_gib: float) -> None:
    """Fail with MemoryError instead of pushing the shared machine into swap or the OOM killer."""
    limit = _status("VmSize") + int(budget_gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class Measure:
    """``with Measure() as m: ...`` → ``m.delta`` (RSS after − before) and ``m.peak`` (peak − before)."""

    def __enter__(self):
        reset_peak()
        self.before = rss()
        return self

    def __exit__(self, *exc):
        self.peak = peak() - self.before
        self.delta = rss() - self.before
        return False


# ---- phases (each in its own process) -----------------------------------------------------------------------
def phase_weights(args) -> dict:
    """Resident size of each frozen module built alone, next to its parameter bytes."""
    import sdxl_random as sr
    import torch

    out = {}
    specs = [
        ("unet_bf16", lambda: sr.build_unet(dtype=torch.bfloat16)),
        ("identitynet_bf16", lambda: sr.build_identitynet(sr.build_unet("meta"), dtype=torch.bfloat16)),
        ("vae_fp32", lambda: sr.build_vae()),
    ]
    for name, build in specs:
        with Measure() as m:
            module = build()
        nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
        out[name] = dict(rss=m.delta, param_bytes=nbytes, params=sr.n_params(module))
        del module
    tok_dir = Path(args.tmp) / "tok"
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sr.write_tokenizers(tok_dir)[0])
    with Measure() as m:
        encoders = sr.build_text_encoders(tok, dtype=torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for e in encoders for p in e.parameters())
    out["text_encoders_bf16"] = dict(
        rss=m.delta, param_bytes=nbytes, params=sum(sr.n_params(e) for e in encoders)
    )
    return out


def _drop_grads(params) -> None:
    """Gradients are measured in the ``optim`` phase; here each is freed as soon as autograd has made it."""
    for p in params:
        p.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))


def _time_ids(res: int):
    import torch

    return torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.bfloat16)


def phase_unet_act(args) -> dict:
    """Forward + backward of the UNet with IP layers trained (the same in both configurations)."""
    import sdxl_random as sr
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    unet = sr.build_unet(dtype=bf16)
    layers = sr.install_ip_layers(unet)
    layers.to(bf16)
    unet.requires_grad_(False)
    layers.requires_grad_(True)
    _drop_grads(layers.parameters())
    if args.ckpt:
        unet.enable_gradient_checkpointing()
    lat = args.res // 8
    # IdentityNet's residual shapes come from a meta-device IdentityNet run on meta inputs.
    cn = sr.build_identitynet(sr.build_unet("meta"), "meta")
    with torch.device("meta"):
        down, mid = cn(
            torch.zeros(1, 4, lat, lat),
            torch.tensor([500]),
            encoder_hidden_states=torch.zeros(1, 16, 2048),
            added_cond_kwargs={"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)},
            controlnet_cond=torch.zeros(1, 3, args.res, args.res),
            return_dict=False,
        )
    shapes = [tuple(d.shape) for d in down] + [tuple(mid.shape)]
    del cn
    runs = []
    for _ in range(args.repeats):
        noisy = torch.randn(1, 4, lat, lat, dtype=bf16)
        text = torch.randn(1, 77, 2048, dtype=bf16)
        face = torch.randn(1, 16, 2048, dtype=bf16, requires_grad=True)
        res = [torch.zeros(s, dtype=bf16, requires_grad=True) for s in shapes]
        added = {"text_embeds": torch.randn(1, 1280, dtype=bf16), "time_ids": _time_ids(args.res)}
        t0 = time.perf_counter()
        with Measure() as m:
            pred = unet(
                noisy,
                torch.tensor([500]),
                encoder_hidden_states=torch.cat([text, face], dim=1),
                added_cond_kwargs=added,
                down_block_additional_residuals=res[:-1],
                mid_block_additional_residual=res[-1],
            ).sample
            F.mse_loss(pred.float(), torch.randn(pred.shape)).backward()
            del pred
        runs.append(dict(peak=m.peak, seconds=time.perf_counter() - t0))
        assert face.grad is not None and all(r.grad is not None for r in res)
    return dict(runs=runs, activations=min(r["peak"] for r in runs))


def phase_cn_act(args) -> dict:
    """Forward + backward of IdentityNet fed the Resampler's tokens (IdentityNet frozen or trained)."""
    import sdxl_random as sr
    import torch

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    cn = sr.build_identitynet(sr.build_unet("meta"), dtype=bf16)
    resampler = sr.build_resampler(dtype=bf16)
    cn.requires_grad_(args.train == "everything")
    resampler.requires_grad_(True)
    trained = list(resampler.parameters()) + (list(cn.parameters()) if args.train == "everything" else [])
    _drop_grads(trained)
    if args.ckpt:
        cn.enable_gradient_checkpointing()
    cn.train(args.train == "everything")
    lat = args.res // 8
    runs = []
    for _ in range(args.repeats):
        emb = torch.randn(1, 512, dtype=bf16)
        noisy = torch.randn(1, 4, lat, lat, dtype=bf16)
        kps = torch.rand(1, 3, args.res, args.res, dtype=bf16)
        added = {"text_embeds": torch.randn(1, 1280, dtype=bf16), "time_ids": _time_ids(args.res)}
        t0 = time.perf_counter()
        with Measure() as m:
            tokens = resampler(emb)
            down, mid = cn(
                noisy,
                torch.tensor([500]),
                encoder_hidden_states=tokens,
                added_cond_kwargs=added,
                controlnet_cond=kps,
                return_dict=False,
            )
            # IdentityNet frozen: its first residuals come before any cross-attention and need no gradient.
            outs = [o for o in (*down, mid) if o.requires_grad]
            torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
            del outs, down, mid, tokens
        runs.append(dict(peak=m.peak, seconds=time.perf_counter() - t0))
    return dict(runs=runs, activations=min(r["peak"] for r in runs))


def trained_shapes(what: str) -> list[tuple[int, ...]]:
    """Shapes of the parameters that train: the adapter (Resampler + IP layers) or IdentityNet."""
    import sdxl_random as sr
    import torch

    if what == "adapter":
        unet = sr.build_unet("meta")
        with torch.device("meta"):
            layers = sr.install_ip_layers(unet)
        params = list(sr.build_resampler("meta").parameters()) + list(layers.parameters())
    else:
        params = list(sr.build_identitynet(sr.build_unet("meta"), "meta").parameters())
    return [tuple(p.shape) for p in params]


def chunks(shapes, size: int = CHUNK_PARAMS) -> list[list[tuple[int, ...]]]:
    import math

    out, cur, n = [], [], 0
    for s in shapes:
        cur.append(s)
        n += math.prod(s)
        if n >= size:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def phase_optim(args) -> dict:
    """fp32 weights, gradients, optimizer states and autocast bf16 copies of one chunk of trained parameters."""
    import torch

    shapes = chunks(trained_shapes(args.what))[args.chunk]
    res = {"params": sum(torch.Size(s).numel() for s in shapes)}
    with Measure() as m:
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    res["weights"] = m.delta
    with Measure() as m:
        for p in params:  # what AccumulateGrad allocates: one fp32 tensor per parameter
            p.grad = torch.randn_like(p)
    res["gradients"] = m.delta
    with Measure() as m:
        copies = [p.detach().to(torch.bfloat16) for p in params if p.ndim > 1]
    res["autocast_copies"] = m.delta
    del copies
    with Measure() as m:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
        opt.step()
    res["adamw_states"], res["adamw_step_peak"] = m.delta, m.peak
    del opt
    try:
        import bitsandbytes as bnb

        with Measure() as m:
            opt = bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=1e-2)
            opt.step()
        res["adamw8bit_states"], res["adamw8bit_step_peak"] = m.delta, m.peak
        res["adamw8bit_state_bytes"] = sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if torch.is_tensor(t)
        )
        del opt
    except ImportError as exc:
        res["adamw8bit_error"] = f"bitsandbytes not importable: {exc}"
    return res


def phase_optim_inbwd(args) -> dict:
    """The 24 GB preset's optimizer (``--optimizer_in_backward``): one optimizer per parameter, each gradient
    made, applied and freed in turn as the post-accumulate-grad hooks do. States = what stays; the transient =
    the peak above them (one gradient, its norm for clipping, the step's temporaries)."""
    import torch

    from faceid.train.in_backward import OptimizerInBackward

    shapes = chunks(trained_shapes(args.what))[args.chunk]
    res = {"params": sum(torch.Size(s).numel() for s in shapes), "largest": max(math.prod(s) for s in shapes)}
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    classes = {"adamw": torch.optim.AdamW}
    try:
        import bitsandbytes as bnb

        classes["adamw8bit"] = bnb.optim.AdamW8bit
    except ImportError as exc:
        res["adamw8bit_error"] = f"bitsandbytes not importable: {exc}"
    for name, cls in classes.items():
        opt = OptimizerInBackward(cls, params, max_grad_norm=1.0, lr=1e-5, weight_decay=1e-2)
        with Measure() as m:
            for p in params:
                p.grad = torch.randn_like(p)
                opt._apply(p)  # what the hook runs
            opt.step()
        res[f"{name}_inbwd_states"], res[f"{name}_inbwd_step_peak"] = m.delta, m.peak
        assert all(p.grad is None for p in params)
        opt.remove_hooks()
        del opt
    return res


def phase_autocast(args) -> dict:
    """Trained weights in fp32 under bf16 autocast with gradient checkpointing, autocast's weight cache on or off
    (``--no-autocast_cache``): the UNet's IP layers, or IdentityNet + Resampler. Peak above the weights of one
    forward (under autocast, as the trainer) + backward (outside), gradients dropped; on − off = the bf16
    copies the cache holds."""
    import sdxl_random as sr
    import torch

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    lat = args.res // 8
    if args.what == "adapter":  # the UNet (bf16, frozen) with fp32 IP layers
        net = sr.build_unet(dtype=bf16)
        layers = sr.install_ip_layers(net)
        net.requires_grad_(False)
        trained = list(layers.float().requires_grad_(True).parameters())
    else:  # IdentityNet + Resampler, fp32, trained
        net = sr.build_identitynet(sr.build_unet("meta"), dtype=torch.float32).train()
        resampler = sr.build_resampler(dtype=torch.float32)
        trained = list(net.parameters()) + list(resampler.parameters())
    _drop_grads(trained)
    net.enable_gradient_checkpointing()
    noisy = torch.randn(1, 4, lat, lat)
    added = {"text_embeds": torch.randn(1, 1280), "time_ids": _time_ids(args.res).float()}
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with Measure() as m:
            with torch.autocast("cpu", dtype=bf16, cache_enabled=bool(args.cache)):
                if args.what == "adapter":
                    out = net(
                        noisy.to(bf16),
                        torch.tensor([500]),
                        encoder_hidden_states=torch.randn(1, 93, 2048, dtype=bf16),
                        added_cond_kwargs={k: v.to(bf16) for k, v in added.items()},
                    ).sample
                    outs = [out]
                else:
                    down, mid = net(
                        noisy,
                        torch.tensor([500]),
                        encoder_hidden_states=resampler(torch.randn(1, 512)),
                        added_cond_kwargs=added,
                        controlnet_cond=torch.rand(1, 3, args.res, args.res),
                        return_dict=False,
                    )
                    outs = [*down, mid]
            torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
            del outs
        runs.append(dict(peak=m.peak, seconds=time.perf_counter() - t0))
    return dict(runs=runs, peak=min(r["peak"] for r in runs))


def phase_vae_act(args) -> dict:
    """VAE encode (no grad, fp32) of one image: a transient before the UNet runs, when latents are not cached."""
    import sdxl_random as sr
    import torch

    vae = sr.build_vae().eval()
    with torch.no_grad(), Measure() as m:
        _ = vae.encode(torch.rand(1, 3, args.res, args.res) * 2 - 1).latent_dist.mean
    return dict(peak=m.peak)


PHASES = dict(
    weights=phase_weights,
    unet_act=phase_unet_act,
    cn_act=phase_cn_act,
    optim=phase_optim,
    vae_act=phase_vae_act,
    optim_inbwd=phase_optim_inbwd,
    autocast=phase_autocast,
)


def run_child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    limit_address_space(args.budget_gib)
    t0 = time.perf_counter()
    result = PHASES[args.phase](args)
    result["phase_seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result))


def spawn(phase: str, budget_gib: float, threads: int, tmp: str, **kw) -> dict:
    """One phase in a fresh niced process; its JSON result."""
    cmd = [sys.executable, str(HERE / "bench_memory.py"), "--phase", phase, "--budget_gib", str(budget_gib)]
    cmd += ["--threads", str(threads), "--tmp", tmp]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    # Niceness 10 for the phase, whatever this process already has (no double nice).
    nice = ["nice", "-n", str(10 - os.nice(0))] if os.nice(0) < 10 else []
    proc = subprocess.run([*nice, *cmd], env=env, capture_output=True, text=True, cwd=str(HERE.parent))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"phase {phase} {kw} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {phase} {kw}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(line[len("RESULT ") :])
