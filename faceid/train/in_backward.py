"""The optimizer step applied during backward (``--optimizer_in_backward``, the 24 GB preset): one optimizer per
trained parameter, stepped by that parameter's post-accumulate-grad hook as soon as its gradient is complete, the
gradient freed right after. A step's gradients are then never all held at once (6.70 GB in fp32 for IdentityNet +
adapter, docs/training.md's memory table); only the one being applied is.

Exact (bit for bit on CPU, tests/train/test_memory_preset.py) w.r.t. the same optimizer stepped after backward:
each parameter gets the same arithmetic with the same learning rate. It needs one backward per update and one
process (checked by the trainer):

* gradient accumulation would step on every micro-batch; DDP averages gradients after these hooks have fired;
  fp16's GradScaler unscales all gradients before the step (use bf16).
* ``max_grad_norm`` cannot see the global norm before the first step is applied, so it clips each parameter's
  gradient to that norm on its own. When the global norm is ≤ max_grad_norm nothing is clipped either way (every
  parameter's norm is ≤ the global one): exact. Above it, each gradient is scaled by min(1, c/‖g_i‖) ≥ c/‖g‖, the
  global factor: parameters with small gradients are not scaled down, the others are clipped to norm c. The global
  norm (before clipping) is still summed up from the parts and logged as ``grad_norm``.
"""

from __future__ import annotations

import functools

import torch


class OptimizerInBackward(torch.optim.Optimizer):
    """``OptimizerInBackward(torch.optim.AdamW, params, lr=...)``: ``opt_cls([p], **kw)`` for each ``p``, stepped
    in ``p``'s post-accumulate-grad hook. ``step()`` only closes the update (the work is done); ``param_groups``
    are the inner optimizers' own dicts, so an LR scheduler sets every one of them."""

    # Like accelerate's AcceleratedOptimizer: a wrapper, Optimizer.__init__ is not called.
    def __init__(self, opt_cls, params, max_grad_norm: float = 0.0, **kw):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("OptimizerInBackward: no parameter requires grad")
        self.optimizers = [opt_cls([p], **kw) for p in self.params]
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self._norm_sq = None
        self._done = set()
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._handles = [p.register_post_accumulate_grad_hook(self._apply) for p in self.params]

    def _apply(self, p: torch.Tensor) -> None:
        i = self._index[id(p)]
        if i in self._done:
            raise RuntimeError(
                "--optimizer_in_backward: a parameter's gradient arrived twice in one update (gradient "
                "accumulation or a second backward); it needs exactly one backward per update"
            )
        if not self._done:  # the first gradient of an update: the norm starts again
            self._norm_sq = None
        self._done.add(i)
        g = p.grad
        norm = torch.linalg.vector_norm(g.detach().float())
        self._norm_sq = norm.square() if self._norm_sq is None else self._norm_sq + norm.square()
        if self.max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s rule, on this parameter alone.
            g.mul_(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0).to(g.dtype))
        self.optimizers[i].step()
        p.grad = None

    @property
    def param_groups(self) -> list:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @property
    def defaults(self) -> dict:
        return self.optimizers[0].defaults

    def grad_norm(self):
        """The global gradient norm of the last update (before clipping), as clip_grad_norm_ returns it."""
        return None if self._norm_sq is None else self._norm_sq.sqrt()

    def step(self, closure=None):
        """The update was applied during backward; this closes it (the next backward may step again)."""
        if closure is not None:
            raise ValueError("OptimizerInBackward.step takes no closure")
        self._done.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # A skipped update (non-finite loss) ran no backward; gradients are freed by the hooks anyway.
        for p in self.params:
            p.grad = None
        self._done.clear()
        self._norm_sq = None

    def state_dict(self) -> dict:
        return {"in_backward": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        from faceid.train.errors import TrainingInputError

        inner = state_dict.get("in_backward")
        if inner is None or len(inner) != len(self.optimizers):
            raise TrainingInputError(
                "the checkpoint's optimizer state was saved "
                + ("without --optimizer_in_backward" if inner is None else f"for {len(inner)} parameters")
                + f" (this run: --optimizer_in_backward, {len(self.optimizers)} parameters); resume with the "
                "flags it was saved with, or start a new --output_dir"
            )
        for o, s in zip(self.optimizers, inner, strict=True):
            o.load_state_dict(s)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()

    def __repr__(self) -> str:
        return f"OptimizerInBackward({len(self.optimizers)} × {type(self.optimizers[0]).__name__})"


def in_backward_optimizer(opt_cls, args, accum: int, world: int):
    """``opt_cls`` made an :class:`OptimizerInBackward` factory, after checking the run can step in backward."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from faceid.train.errors import TrainingInputError

    state = AcceleratorState()
    why = []
    if accum > 1:
        why.append(f"--gradient_accumulation_steps {accum} (use 1)")
    if world > 1 or state.distributed_type == DistributedType.DEEPSPEED:
        why.append(
            f"{world} processes / {state.distributed_type} (one process; several GPUs: DeepSpeed ZeRO-2, "
            "configs/accelerate/deepspeed_zero2*.yaml, without this flag)"
        )
    if state.mixed_precision == "fp16":
        why.append("--mixed_precision fp16 (its gradient scaler needs every gradient first; use bf16)")
    if why:
        raise TrainingInputError("--optimizer_in_backward needs one backward per update: " + "; ".join(why))
    return functools.partial(OptimizerInBackward, opt_cls, max_grad_norm=args.max_grad_norm)
