"""Training memory of InstantID at real SDXL size, measured on this CPU (bf16, batch 1), per component.

    nice -n 10 python benchmarks/bench_memory.py [--resolutions 256,512] [--budget_gib 12] [--json OUT]

Real-size UNet (2.57 B), IdentityNet (1.25 B), Resampler (0.08 B) and IP layers (0.34 B) are built from
configs/sdxl/*.json with random weights (nothing downloaded). Every measurement runs in its own subprocess
(``--phase``), niced, one at a time, under an address-space limit, and reads the process's resident memory from
/proc/self/status (peak ``VmHWM`` reset through /proc/self/clear_refs before each phase; glibc is told to return
freed blocks with ``MALLOC_MMAP_THRESHOLD_`` so a drop in use is visible). A full "everything" step with fp32 AdamW
masters needs ~30 GB, more than this shared machine can give one process, so it is measured in parts and summed:

* frozen weights: each module built alone (``weights``);
* activations: a real forward + backward of the UNet (+ IP layers) and of IdentityNet (+ Resampler), each in its
  own process, with the parameters in bf16 and the gradients dropped as they arrive (``unet_act``, ``cn_act``);
  the UNet gets IdentityNet-shaped residuals and face tokens that require grad, IdentityNet gets upstream
  gradients of the residuals' shapes, so each backward covers what the joint one covers;
* trained fp32 weights, their gradients, AdamW and AdamW8bit (bitsandbytes) states, and the bf16 copies autocast
  keeps for backward: the trained parameters' real shapes, in chunks of ~0.35 B parameters (``optim``).

* the 24 GB preset: the same chunks with one optimizer per parameter, each gradient made, applied and freed in
  turn (``optim_inbwd``, ``--optimizer_in_backward``); fp32 trained weights under bf16 autocast with gradient
  checkpointing, autocast's weight cache on and off (``autocast``, ``--no-autocast_cache``; UNet + IP layers and
  IdentityNet + Resampler at the low resolution: the cache holds weight copies, whatever the resolution).

The real step's peak is then at most weights + gradients + optimizer states + autocast copies + activations
(gradients build up while activations are freed during backward, so the sum is an upper bound by at most the
gradients). 1024 px activations are the 512 px ones times the 256→512 factor measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory_phases import PHASES, chunks, run_child, spawn, trained_shapes  # noqa: E402

GB = 1e9
RESOLUTIONS = "256,512"
BUDGET_GIB = 12.0  # address-space head-room per phase above what the interpreter has mapped at start


# ---- the report ----------------------------------------------------------------------------------------------
def plan(resolutions) -> list[tuple[str, str, dict]]:
    """(section, key, phase kwargs), most needed first: weights, the adapter's optimizer, activations without
    checkpointing, IdentityNet's optimizer chunks, then with checkpointing; a partial run gives complete rows
    (IdentityNet's states scaled per parameter from the adapter's until its own chunks are measured)."""
    steps = [("weights", "all", dict(phase="weights"))]

    def optim(what):
        for i in range(len(chunks(trained_shapes(what)))):
            steps.append(("optim", f"{what}/{i}", dict(phase="optim", what=what, chunk=i)))

    def acts(ckpt):
        # Adapter-only rows first (UNet + frozen IdentityNet at both resolutions), then IdentityNet trained.
        for res in resolutions:
            steps.append(("unet_act", f"{res}/{ckpt}", dict(phase="unet_act", res=res, ckpt=ckpt)))
            train = "adapter"
            steps.append(
                ("cn_act", f"{res}/{ckpt}/{train}", dict(phase="cn_act", res=res, ckpt=ckpt, train=train))
            )
        for res in resolutions:
            train = "everything"
            steps.append(
                ("cn_act", f"{res}/{ckpt}/{train}", dict(phase="cn_act", res=res, ckpt=ckpt, train=train))
            )
        if ckpt == 0:
            for res in resolutions:
                steps.append(("vae_act", str(res), dict(phase="vae_act", res=res)))

    optim("adapter")
    acts(0)
    optim("identitynet")
    acts(1)
    # The 24 GB preset: optimizer in backward per chunk; autocast's weight cache on/off at the low resolution.
    for what in ("adapter", "identitynet"):
        for i in range(len(chunks(trained_shapes(what)))):
            steps.append(("optim_inbwd", f"{what}/{i}", dict(phase="optim_inbwd", what=what, chunk=i)))
    for what in ("identitynet", "adapter"):
        for cache in (1, 0):
            kw = dict(phase="autocast", what=what, cache=cache, res=resolutions[0])
            steps.append(("autocast", f"{what}/{cache}", kw))
    return steps


def collect(args) -> dict:
    """Run every phase not already in ``--json`` (so an interrupted run continues), saving after each."""
    import tempfile

    resolutions = [int(r) for r in args.resolutions.split(",")]
    out = Path(args.json) if args.json else None
    data = json.loads(out.read_text()) if out and out.exists() else {}
    data["resolutions"] = resolutions
    with tempfile.TemporaryDirectory() as tmp:
        for section, key, kw in plan(resolutions):
            if key in data.get(section, {}):
                continue
            phase = kw.pop("phase")
            if phase in ("unet_act", "cn_act", "autocast"):
                kw["repeats"] = args.repeats
            data.setdefault(section, {})[key] = spawn(
                phase, budget_gib=args.budget_gib, threads=args.threads, tmp=tmp, **kw
            )
            if out:
                tmp_out = out.with_name(out.name + ".partial")
                tmp_out.write_text(json.dumps(data, indent=1))
                os.replace(tmp_out, out)
    return data


def summed_optim(data: dict) -> dict:
    """Per trained set, the chunks' measurements summed. IdentityNet not (fully) measured yet: the adapter's
    bytes per parameter times IdentityNet's parameter count, marked ``scaled_from_adapter``."""
    out = {}
    expected = {"adapter": None, "identitynet": None}
    for what in expected:
        parts = [v for k, v in data.get("optim", {}).items() if k.split("/")[0] == what]
        if parts:
            out[what] = {k: sum(p.get(k, 0) for p in parts) for k in parts[0] if isinstance(parts[0][k], int)}
            out[what]["chunks"] = len(parts)
    n_cn = data.get("weights", {}).get("all", {}).get("identitynet_bf16", {}).get("params")
    cn = out.get("identitynet")
    if "adapter" in out and n_cn and (cn is None or cn["params"] != n_cn):
        a = out["adapter"]
        out["identitynet"] = {
            k: round(v * n_cn / a["params"]) for k, v in a.items() if k not in ("params", "chunks")
        }
        out["identitynet"].update(params=n_cn, chunks=0, scaled_from_adapter=1)
    return out


# (optimizer, autocast cache) of the rows with the optimizer step in backward: whole model, checkpointing on.
PRESET_VARIANTS = (("adamw", False), ("adamw8bit", True), ("adamw8bit", False))
PRESET_24GB = ("adamw8bit", False)  # the launcher's PRESET=24gb


def in_backward_parts(data: dict) -> dict:
    """Per trained set, measured with the optimizer in backward: the states (chunks summed) and the largest
    transient above them (one gradient + the step's temporaries; the maximum over chunks, not a sum)."""
    out = {}
    for what in ("adapter", "identitynet"):
        parts = [v for k, v in data.get("optim_inbwd", {}).items() if k.split("/")[0] == what]
        if not parts:
            continue
        d = {"params": sum(p["params"] for p in parts)}
        for opt in ("adamw", "adamw8bit"):
            if all(f"{opt}_inbwd_states" in p for p in parts):
                d[f"{opt}_states"] = sum(p[f"{opt}_inbwd_states"] for p in parts)
                d[f"{opt}_transient"] = max(
                    p[f"{opt}_inbwd_step_peak"] - p[f"{opt}_inbwd_states"] for p in parts
                )
        out[what] = d
    return out


def autocast_saving(data: dict) -> int | None:
    """Peak bytes autocast's weight cache costs (cache on − off, UNet + IP layers and IdentityNet + Resampler,
    fp32 trained weights, checkpointing on); None until all four phases are measured."""
    a = data.get("autocast", {})
    pairs = [(f"{w}/1", f"{w}/0") for w in ("adapter", "identitynet")]
    if not all(k in a for pair in pairs for k in pair):
        return None
    return sum(max(0, a[on]["peak"] - a[off]["peak"]) for on, off in pairs)


def preset_rows(data: dict, rows: list[dict]) -> list[dict]:
    """The whole model with checkpointing and the optimizer step in backward, from the matching row: gradients →
    the largest transient, optimizer states → as measured per parameter, autocast copies → minus the measured
    saving when the cache is off. Rows appear once every chunk of both trained sets is measured."""
    o, ib, save = summed_optim(data), in_backward_parts(data), autocast_saving(data)
    trained = ("adapter", "identitynet")
    out = []
    for opt, cache in PRESET_VARIANTS:
        base = next(
            (r for r in rows if r["train"] == "everything" and r["ckpt"] and r["optimizer"] == opt), None
        )
        if base is None or (not cache and save is None):
            continue
        if any(f"{opt}_states" not in ib.get(t, {}) or ib[t]["params"] != o[t]["params"] for t in trained):
            continue
        row = dict(
            base,
            in_backward=True,
            autocast_cache=cache,
            gradients=max(ib[t][f"{opt}_transient"] for t in trained),
            optimizer_states=sum(ib[t][f"{opt}_states"] for t in trained),
            autocast_copies=base["autocast_copies"] - (0 if cache else save),
        )
        fixed = sum(row[k] for k in FIXED)
        row["total"] = {r: fixed + a for r, a in row["activations"].items()}
        out.append(row)
    return out


FIXED = ("frozen_weights", "trained_weights", "gradients", "optimizer_states", "autocast_copies")


def table(data: dict) -> tuple[list[dict], str]:
    """Rows per (configuration, checkpointing, optimizer) with activations measured at the low resolution at
    least; the high one, the factor and the 1024 px scaling appear when the high one is measured too."""
    w, o = data["weights"]["all"], summed_optim(data)
    lo, hi = data["resolutions"][0], data["resolutions"][-1]
    unet_act, cn_act = data.get("unet_act", {}), data.get("cn_act", {})
    rows = []
    for train in ("adapter", "everything"):
        for ckpt in (0, 1):
            for opt in ("adamw", "adamw8bit"):
                trained = ["adapter"] + (["identitynet"] if train == "everything" else [])
                key = f"{opt}_states"
                if any(key not in o.get(t, {}) for t in trained):
                    continue
                acts = {
                    res: unet_act[f"{res}/{ckpt}"]["activations"]
                    + cn_act[f"{res}/{ckpt}/{train}"]["activations"]
                    for res in (lo, hi)
                    if f"{res}/{ckpt}" in unet_act and f"{res}/{ckpt}/{train}" in cn_act
                }
                if lo not in acts:
                    continue
                factor = acts[hi] / acts[lo] if hi in acts else None
                if factor is not None:
                    acts[1024] = acts[hi] * factor ** math.log(1024 / hi, hi / lo)
                row = dict(
                    train=train,
                    ckpt=bool(ckpt),
                    optimizer=opt,
                    frozen_weights=w["unet_bf16"]["rss"]
                    + (0 if train == "everything" else w["identitynet_bf16"]["rss"]),
                    trained_weights=sum(o[t]["weights"] for t in trained),
                    gradients=sum(o[t]["gradients"] for t in trained),
                    optimizer_states=sum(o[t][key] for t in trained),
                    autocast_copies=sum(o[t]["autocast_copies"] for t in trained),
                    activations=acts,
                    factor=factor,
                    identitynet_states_scaled=bool(o.get("identitynet", {}).get("scaled_from_adapter"))
                    and train == "everything",
                )
                fixed = sum(
                    row[k]
                    for k in (
                        "frozen_weights",
                        "trained_weights",
                        "gradients",
                        "optimizer_states",
                        "autocast_copies",
                    )
                )
                row["total"] = {r: fixed + a for r, a in acts.items()}
                rows.append(row)
    rows += preset_rows(data, rows)

    def gb(x, fmt=".2f"):
        return "n/m" if x is None else format(x / GB, fmt)

    head = (
        f"| trains | grad. ckpt | optimizer | frozen weights (bf16) | trained weights (fp32) | gradients | "
        f"optimizer states | autocast bf16 copies | activations {lo} / {hi} px (×) | activations 1024 px "
        f"(scaled) | total {hi} px | total 1024 px |\n|" + " --- |" * 12
    )
    lines = [head]
    for r in rows:
        a, t = r["activations"], r["total"]
        factor = "" if r["factor"] is None else f" ({r['factor']:.2f})"
        star = "*" if r["identitynet_states_scaled"] else ""
        lines.append(
            f"| {'adapter only' if r['train'] == 'adapter' else 'everything'} | {'yes' if r['ckpt'] else 'no'} "
            f"| {optimizer_label(r)} | {gb(r['frozen_weights'])} "
            f"| {gb(r['trained_weights'])}{star} | {gb(r['gradients'])}{star} | {gb(r['optimizer_states'])}{star} "
            f"| {gb(r['autocast_copies'])}{star} | {gb(a[lo])} / {gb(a.get(hi))}{factor} "
            f"| {gb(a.get(1024), '.1f')} | {gb(t.get(hi), '.1f')} | {gb(t.get(1024), '.1f')} |"
        )
    lines.append(
        "n/m: not measured (yet); *: IdentityNet's part scaled per parameter from the adapter's measurement; "
        "in backward: --optimizer_in_backward (gradients: the largest one in flight); autocast cache off: "
        "--no-autocast_cache; 24 GB preset: the launcher's PRESET=24gb"
    )
    return rows, "\n".join(lines)


def optimizer_label(r: dict) -> str:
    label = "AdamW8bit" if r["optimizer"] == "adamw8bit" else "AdamW"
    if r.get("in_backward"):
        label += ", in backward"
        if not r["autocast_cache"]:
            label += ", autocast cache off"
        if (r["optimizer"], r["autocast_cache"]) == PRESET_24GB:
            label = f"**24 GB preset**: {label}"
    return label


def details(data: dict) -> str:
    w, o = data["weights"]["all"], summed_optim(data)
    lines = ["component sizes (GB = 1e9 bytes): resident size measured vs parameter bytes"]
    for k, v in w.items():
        if not isinstance(v, dict):
            continue
        lines.append(
            f"  {k:20s} {v['params'] / 1e9:6.3f} B params  rss {v['rss'] / GB:6.2f}  bytes {v['param_bytes'] / GB:6.2f}"
        )
    for k, v in o.items():
        skip = ("params", "chunks", "scaled_from_adapter")
        extra = ", ".join(f"{n} {v[n] / GB:.2f}" for n in v if n not in skip)
        if v.get("scaled_from_adapter"):
            extra += " (SCALED per parameter from the adapter's measurement, not measured on IdentityNet)"
        lines.append(f"  {k} (trained, {v['params'] / 1e9:.3f} B params, {v['chunks']} chunks): {extra}")
    for res, v in data.get("vae_act", {}).items():
        lines.append(f"  VAE encode transient at {res} px (fp32, no grad): {v['peak'] / GB:.2f}")
    for k, v in in_backward_parts(data).items():
        extra = ", ".join(f"{n} {v[n] / GB:.3f}" for n in v if n != "params")
        lines.append(f"  {k} optimizer in backward ({v['params'] / 1e9:.3f} B params): {extra}")
    for k, v in data.get("autocast", {}).items():
        what, cache = k.split("/")
        lines.append(
            f"  autocast {'UNet + IP layers' if what == 'adapter' else 'IdentityNet + Resampler'} fp32 trained, "
            f"ckpt, cache {'on' if cache == '1' else 'off'}: peak {v['peak'] / GB:.2f} ({v['runs'][0]['seconds']:.0f} s)"
        )
    lines.append("activation phases (peak above weights, s per forward+backward on this CPU):")
    for name in ("unet_act", "cn_act"):
        for k, v in data.get(name, {}).items():
            runs = ", ".join(f"{r['peak'] / GB:.2f} GB {r['seconds']:.0f} s" for r in v["runs"])
            lines.append(f"  {name} {k}: {runs}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default=RESOLUTIONS, help="two resolutions, low,high (the factor)")
    p.add_argument("--budget_gib", type=float, default=BUDGET_GIB)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="forward+backward runs per activation phase")
    p.add_argument(
        "--json", help="raw measurements: saved after each phase, phases already in it are skipped"
    )
    p.add_argument("--from_json", help="print the tables of an earlier --json without measuring")
    g = p.add_argument_group("internal: one phase")
    g.add_argument("--phase", choices=sorted(PHASES))
    g.add_argument("--res", type=int, default=512)
    g.add_argument("--ckpt", type=int, default=0)
    g.add_argument("--train", default="adapter", choices=["adapter", "everything"])
    g.add_argument("--what", default="adapter", choices=["adapter", "identitynet"])
    g.add_argument("--chunk", type=int, default=0)
    g.add_argument(
        "--cache", type=int, default=1, help="autocast phase: autocast's weight cache on (1) / off (0)"
    )
    g.add_argument("--tmp", default="/tmp")
    return p.parse_args(argv)


def main(args) -> None:
    if args.phase:
        return run_child(args)
    data = json.loads(Path(args.from_json).read_text()) if args.from_json else collect(args)
    print(details(data))
    print()
    print(table(data)[1])


if __name__ == "__main__":
    main(parse_args())
