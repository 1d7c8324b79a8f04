"""CurvatureMonitor: sharpness against the edge-of-stability threshold, traces per block, Taylor check."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from thetascope._validation import check_positive_int
from thetascope.callbacks._lightning import (
    StateCheckedCallback,
    log_to_loggers,
    publish_callback_metrics,
    trainer_all_gather,
    warn_unreadable_state,
)
from thetascope.keys import DEFAULT_PREFIX
from thetascope.monitors.curvature import CurvatureCore, distributed_all_reduce_mean

__all__ = ["BATCH_SOURCES", "CurvatureMonitor"]

#: String values of ``CurvatureMonitor(batch=...)``; any other object is used as the probe batch itself.
BATCH_SOURCES: tuple[str, ...] = ("current", "fixed")
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
_BACKEND_TEXT = {
    "double_backward": "double backward (exact)",
    "math_sdpa": "double backward with SDPA's math kernel (exact; the model's fused attention kernel has no "
    "double backward)",
    "finite_difference": "central finite differences of two gradients (approximate)",
}


class CurvatureMonitor(StateCheckedCallback):
    """Sharpness of the training loss against the optimizer's edge-of-stability threshold, and where it lives.

    Every ``every_n_steps`` optimizer steps (``global_step % every_n_steps == 0``; never on accumulation
    micro-steps) the loss on a held batch is examined at the parameters θ_t the step started from, right
    after the step was taken, and these keys (prefix ``stability/``) go to every logger at
    ``step = global_step`` of θ_t:

    * ``curvature/sharpness``: the top Hessian eigenvalue (Lanczos on Hessian-vector products, warm-started
      from the previous measurement) and ``curvature/sharpness_residual`` (its convergence,
      ``‖Hx − λx‖/|λ|``);
    * ``curvature/precond_sharpness`` for Adam/AdamW: ``λ_max(P⁻¹H)`` with the optimizer's own bias-corrected
      second moment plus eps as ``P``;
    * ``curvature/threshold`` (2/lr for SGD, ``(2 + 2β)/lr`` with momentum, ``(2 + 2β₁)/((1 − β₁) lr)`` for
      Adam, from the step's live lr and β) and the headline ``curvature/stability_ratio``: the matching
      sharpness over it. Near 1 training is at the edge of stability; above 1 the quadratic model of the
      loss predicts divergence along the top direction. It is also put into ``trainer.callback_metrics``;
    * ``curvature/trace`` (Hutchinson, with ``curvature/trace_stderr``), per block
      (``curvature/trace/layer_XX``) and per sublayer type (``curvature/trace_type/attn_q`` ... ``attn_o``,
      ``ffn``, ``norm``, ``embedding``, ``head``);
    * the Taylor check of the step taken: ``curvature/taylor_first`` (``gᵀΔθ``), ``curvature/taylor_second``
      (``gᵀΔθ + ½ΔθᵀHΔθ``), the observed ``curvature/loss_change`` on the same batch and their ratio
      ``curvature/taylor_ratio``.

    The held batch is the step's own batch (``batch="current"``), the first measured batch kept for the whole
    run (``"fixed"``, comparable over time, saved in checkpoints), or a batch you pass. The loss is
    ``training_step(batch, 0)`` (its ``self.log`` calls silenced) unless ``loss_fn(pl_module, batch)`` is
    given; it is evaluated in eval mode and full precision (outside autocast). Parameters, ``.grad``,
    optimizer state, buffers, RNG states, train/eval modes and the AMP scaler are exactly as before. Under DDP
    every HVP is all-reduced (``autograd.grad`` bypasses DDP's hooks), so all ranks measure the Hessian of
    the global loss; sharded strategies (FSDP, FSDP2 via ModelParallel, DeepSpeed) are refused at setup.
    The HVP backend is chosen at the first measurement and reported once. Cost, on measurement steps only:
    about ``iters`` (+ ``iters`` for Adam) + ``trace_samples`` + 3 HVPs, each about one backward pass (two
    forward/backward passes for finite differences), and three copies of the parameters.

    Args:
        every_n_steps: measure every this many optimizer steps (>= 1).
        batch: ``"current"``, ``"fixed"`` or a batch object.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor`` (default: ``training_step``).
        method, iters, trace_samples, backend, fd_step, train_mode, precondition, seed: see
            :class:`~thetascope.monitors.curvature.CurvatureCore`.
        prefix: key prefix.
        strict: raise on a failed measurement instead of warning once and disabling it.

    Example:
        >>> from thetascope.callbacks import CurvatureMonitor
        >>> CurvatureMonitor(every_n_steps=100, batch="fixed").state_key
        "CurvatureMonitor{'every_n_steps': 100, 'prefix': 'stability/', 'batch': 'fixed'}"
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        batch: Any = "current",
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        method: str = "lanczos",
        iters: int = 20,
        trace_samples: int = 4,
        backend: str = "auto",
        fd_step: float | None = None,
        train_mode: bool = False,
        precondition: bool = True,
        seed: int = 0,
        prefix: str = DEFAULT_PREFIX,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        if isinstance(batch, str) and batch not in BATCH_SOURCES:
            raise ValueError(f"batch must be one of {list(BATCH_SOURCES)} or a batch object, got {batch!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be None or callable(pl_module, batch), got {loss_fn!r}")
        self.batch_source = batch if isinstance(batch, str) else "given"
        self._probe_batch: Any = None if isinstance(batch, str) else batch
        self.loss_fn = loss_fn
        self._core_kwargs: dict[str, Any] = dict(
            method=method,
            iters=iters,
            trace_samples=trace_samples,
            backend=backend,
            fd_step=fd_step,
            train_mode=train_mode,
            precondition=precondition,
            seed=seed,
            prefix=prefix,
            strict=strict,
        )
        self.core = CurvatureCore(nn.Module(), **self._core_kwargs)  # validates now; rebuilt at setup
        self.prefix = prefix
        self._restored: Mapping[str, Any] | None = None
        self._batch: Any = None
        self._pending: tuple[int, Any] | None = None
        self._last_step = -1
        self._announced = False
        self.last_values: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, prefix=self.prefix, batch=self.batch_source
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
        sharded = [n for n in names if n in _SHARDED]
        if sharded:
            raise RuntimeError(
                f"CurvatureMonitor does not support {sharded[0]}: parameters are sharded across ranks, so "
                "Hessian-vector products would be products of shards. Use DDP (strategy='ddp'), or remove "
                "the callback for sharded runs."
            )
        self.core = CurvatureCore(pl_module, **self._core_kwargs)
        if self._restored is not None:
            self.core.load_state_dict(self._restored)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch  # a reference only; copied (for "fixed") on a measurement step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step or not self.core.guard.active("curvature"):
            return
        self._last_step = step
        if self.batch_source == "fixed" and self._probe_batch is None:
            self._probe_batch = apply_to_collection(self._batch, Tensor, lambda t: t.detach().clone())
        held = self._batch if self.batch_source == "current" else self._probe_batch
        self.core.snapshot(optimizer)
        self._pending = (step, (optimizer, held))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None or trainer.global_step <= self._pending[0]:
            return  # no pending measurement, or the optimizer has not stepped yet (accumulation)
        step, (optimizer, held) = self._pending
        self._pending = None
        held = move_data_to_device(held, pl_module.device)
        all_reduce = distributed_all_reduce_mean() if trainer.world_size > 1 else (lambda t: t)
        values = self.core.measure(lambda: self._loss(pl_module, held), optimizer, all_reduce)
        reduced = self.core.reduce(values, trainer_all_gather(trainer))
        self._announce()
        try:
            log_to_loggers(trainer, reduced, step)
            publish_callback_metrics(trainer, self.core.headline(reduced))
        except Exception as err:  # every rank has taken part in the collectives: this is logging only
            self.core.guard.warn("logging", err, trainer.global_rank)
        self.last_values = reduced

    def _loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        # training_step's self.log calls would log the probe loss as the training loss: silence them
        pl_module.log = _no_log  # type: ignore[method-assign]
        pl_module.log_dict = _no_log  # type: ignore[method-assign]
        try:
            out = pl_module.training_step(batch, 0)
        finally:
            del pl_module.log, pl_module.log_dict
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor):
            raise TypeError("training_step returned no loss tensor; pass loss_fn= to CurvatureMonitor")
        return loss

    def _announce(self) -> None:
        if self._announced or self.core.backend is None:
            return
        self._announced = True
        text = f"CurvatureMonitor: Hessian-vector products by {_BACKEND_TEXT[self.core.backend]}"
        if self.core.backend == "finite_difference" and self.core.backend_choice == "auto":
            rank_zero_warn(
                f"{text}; double backward failed ({self.core.backend_note}).", category=UserWarning
            )
        else:
            rank_zero_info(text + ".")

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"core": self.core.state_dict(), "last_step": self._last_step}
        if self.batch_source == "fixed" and self._probe_batch is not None:
            state["probe_batch"] = move_data_to_device(self._probe_batch, torch.device("cpu"))
        return state

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            core_state = state_dict["core"]
            self.core.load_state_dict(core_state)
            self._restored = core_state
            self._last_step = int(state_dict.get("last_step", -1))
            if self.batch_source == "fixed" and "probe_batch" in state_dict:
                self._probe_batch = state_dict["probe_batch"]
        except Exception as err:  # an older or foreign layout: start fresh rather than stop the run
            warn_unreadable_state(type(self).__name__, err)
            self._restored = None


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while the probe loss is evaluated."""
