"""One optimizer step of the trainer (train_instantId_sdxl.py's loop): the micro-batches' forward and backward,
the update (or the skip after a non-finite loss) and the logged scalars. The loop itself, with its checkpoints and
validation, stays in the script, as in diffusers' training examples."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass, field

from faceid.train.config import TrainHooks


@dataclass
class Schedule:
    """How many optimizer updates the run makes, and how batches group into them."""

    accum: int  # micro-batches per update
    batches_per_epoch: int  # per process
    updates_per_epoch: int
    max_steps: int
    num_epochs: int

    def trainer_state(self, step: int, world: int, seed: int) -> dict:
        # What resume compares with the new run's setup (a change breaks the exact data order).
        return {"global_step": step, "epoch": step // self.updates_per_epoch,
                "batches_per_epoch": self.batches_per_epoch, "gradient_accumulation_steps": self.accum,
                "world_size": world, "seed": seed}  # fmt: skip


@dataclass
class Run:
    """What one optimizer step needs: the launch, the models and their optimizer, the data schedule."""

    args: argparse.Namespace
    accelerator: object
    parts: dict
    model: object  # as prepared (DDP-wrapped on several processes)
    unwrapped: object
    params: list
    optimizer: object
    lr_scheduler: object
    ema: object
    weight_dtype: object
    cache: object
    schedule: Schedule
    hooks: TrainHooks
    compute_loss: object


@dataclass
class StepResult:
    """One update's micro-batches: their losses (empty when a loss was non-finite), timings and samples."""

    n_micro: int
    t_start: float
    bad: bool = False
    losses: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    data_time: float = 0.0
    id_sum: float = 0.0
    id_count: int = 0
    phase: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


PHASES = ("vae_time", "text_time", "fwd_bwd_time", "optimizer_time")


def forward_backward(run: Run, loader, epoch: int, u: int) -> StepResult:
    """The micro-batches of update ``u``: loss, backward (gradients all-reduced once, on the last one)."""
    import torch

    import faceid.train.model as training

    args, acc, sched = run.args, run.accelerator, run.schedule
    rank = acc.process_index
    step = StepResult(min(sched.accum, sched.batches_per_epoch - u * sched.accum), time.perf_counter())
    for m in range(step.n_micro):
        t0 = time.perf_counter()
        batch = next(loader)
        if run.hooks.batch is not None:
            batch = run.hooks.batch(batch)
        step.data_time += time.perf_counter() - t0
        # Noise and timesteps depend on (seed, micro-step, rank) only: a resumed run draws the same.
        micro = (epoch * sched.batches_per_epoch) + u * sched.accum + m
        gen = training.micro_generator(args.seed, micro, rank, acc.device)
        stats = {"timing": args.log_phase_times}
        t0 = training.phase_clock(acc.device, stats)
        with acc.autocast():
            loss = run.compute_loss(batch, run.parts, args, gen, run.weight_dtype, run.cache, stats=stats)
        if "id_loss" in stats:
            step.id_sum += float(stats["id_loss"]) * stats["id_count"]
            step.id_count += stats["id_count"]
        # Every rank must agree to skip, or DDP's all-reduce in backward would hang.
        flag = acc.reduce(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device), "max")
        if flag.item() > 0 or step.bad:
            step.bad = True
            continue
        step.losses.append(loss.detach())
        sync = m == step.n_micro - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.model):
            acc.backward(loss / step.n_micro)
        if t0 is not None:
            for k in ("vae_time", "text_time"):
                step.phase[k] += stats.get(k, 0.0)
            t1 = training.phase_clock(acc.device, stats)
            step.phase["fwd_bwd_time"] += t1 - t0 - stats.get("vae_time", 0.0) - stats.get("text_time", 0.0)
        step.samples.append({"index": list(batch["index"]), "ref_index": list(batch["ref_index"])})
    return step


def skip_update(run: Run, global_step: int, nonfinite_in_a_row: int, log) -> int:
    """One bad batch (a NaN from fp16 overflow, a broken sample) should not end a long run; many should."""
    nonfinite_in_a_row += 1
    run.optimizer.zero_grad(set_to_none=True)
    log.warning(f"step {global_step + 1}: non-finite loss; step skipped ({nonfinite_in_a_row} in a row)")
    if nonfinite_in_a_row >= run.args.max_nonfinite_steps:
        raise RuntimeError(
            f"{nonfinite_in_a_row} non-finite losses in a row; stopping (lower the learning rate, "
            "use bf16 or an fp16-safe VAE, or check the data)"
        )
    return nonfinite_in_a_row


def optimizer_step(run: Run, step: StepResult):
    """Clip, step, schedule, EMA; returns the gradient norm (None without clipping)."""
    import faceid.train.model as training

    args, device = run.args, run.accelerator.device
    t0 = training.phase_clock(device, {"timing": args.log_phase_times})
    grad_norm = None
    if args.max_grad_norm and args.max_grad_norm > 0:
        if getattr(args, "optimizer_in_backward", False):  # clipped per parameter during backward
            grad_norm = getattr(run.optimizer, "optimizer", run.optimizer).grad_norm()
        else:
            grad_norm = run.accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.unwrapped)
    if t0 is not None:
        step.phase["optimizer_time"] = training.phase_clock(device, {"timing": True}) - t0
    return grad_norm


def step_scalars(run: Run, step: StepResult, grad_norm) -> dict:
    """The logged scalars of a finished update, averaged over all processes."""
    import torch

    args, acc = run.args, run.accelerator
    step_time = time.perf_counter() - step.t_start
    mean_loss = acc.gather(torch.stack(step.losses).mean().reshape(1)).mean().item()
    samples = step.n_micro * args.train_batch_size * acc.num_processes
    logs = {"loss": mean_loss, "lr": run.lr_scheduler.get_last_lr()[0], "data_time": step.data_time,
            "step_time": step_time, "samples_per_sec": samples / max(step_time, 1e-9)}  # fmt: skip
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    if args.log_phase_times:
        logs.update(step.phase)
    if args.id_loss_weight > 0:
        # Logged apart: the mean over the samples it applied to, on all processes.
        pair = torch.tensor([[step.id_sum, step.id_count]], device=acc.device)
        s, c = acc.gather(pair).sum(0)
        if c > 0:
            logs["id_loss"] = float(s / c)
    return logs


def make_optimizer(args, params, accum: int, world: int, max_steps: int):
    """AdamW (or bitsandbytes' 8-bit AdamW) and the learning-rate schedule."""
    import torch
    from diffusers.optimization import get_scheduler

    from faceid.train import speed
    from faceid.train.errors import TrainingInputError

    lr = args.learning_rate
    if args.scale_lr:
        lr *= accum * args.train_batch_size * world
    opt_cls, impl = torch.optim.AdamW, speed.adamw_kwargs(getattr(args, "optimizer_impl", "auto"), params)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TrainingInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from exc
        opt_cls, impl = bnb.optim.AdamW8bit, {}
    if getattr(args, "optimizer_in_backward", False):
        from faceid.train.in_backward import in_backward_optimizer

        opt_cls = in_backward_optimizer(opt_cls, args, accum, world)
    optimizer = opt_cls(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **impl,
    )
    # accelerate steps a prepared scheduler once per process: count steps × processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=max_steps * world,
    )
    return optimizer, lr_scheduler


def resume(args, accelerator, log, batches_per_epoch: int, accum: int, world: int, model, ema=None) -> int:
    """Load the checkpoint ``--resume_from_checkpoint`` names (if any) and return its global step."""
    from faceid.train import checkpoints as ckpt

    path = ckpt.resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and path is None:
        log.info(f"No complete checkpoint in {args.output_dir}; starting a new run")
    if path is None:
        return 0
    log.info(f"Resuming from {path}")
    accelerator.load_state(str(path))
    if ema is not None and not ema.load(path):
        log.warning(f"{path} holds no EMA: the average starts from the resumed weights")
        ema.reset(model)
    state = ckpt.read_state(path)
    now = {"batches_per_epoch": batches_per_epoch, "gradient_accumulation_steps": accum, "world_size": world}
    changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) not in (None, v)}
    if changed:
        log.warning(f"resuming with a different setup {changed}: the data order will not continue exactly")
    return int(state["global_step"])


class StepLogs:
    """``train_log.jsonl`` + trackers (main process) and ``samples/rank-R.jsonl`` (each process)."""

    def __init__(self, args, rank: int, accelerator):
        self.accelerator = accelerator
        self.train_log = os.path.join(args.output_dir, "train_log.jsonl")
        self.sample_log = (
            os.path.join(args.output_dir, "samples", f"rank-{rank}.jsonl") if args.log_samples else None
        )
        self.rank = rank
        if self.sample_log:
            os.makedirs(os.path.dirname(self.sample_log), exist_ok=True)

    def samples(self, step: int, losses, batches) -> None:
        if not self.sample_log:
            return
        import torch

        local = None if losses is None else float(torch.stack(losses).mean())
        entry = {"step": step, "rank": self.rank, "loss": local, "batches": batches}
        with open(self.sample_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def scalars(self, step: int, logs: dict) -> None:
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            with open(self.train_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
