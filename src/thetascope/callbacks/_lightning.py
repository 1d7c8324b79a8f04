"""Lightning glue shared by the callbacks: strategy checks, the trainer's collective, loggers, checkpoints.

Nothing here runs on unmeasured steps; every function may sync (it is only called on measurement steps).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from thetascope._validation import check_choice, check_positive_int
from thetascope.callbacks._loggers import write_images, write_scalars
from thetascope.keys import DEFAULT_PREFIX, LOG_MODES, headline_only
from thetascope.monitors._collective import AllGather, PackedValues, reduce_packed

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "FSDP2_ADVICE",
    "DiagnosedCallback",
    "StateCheckedCallback",
    "fit_end_diagnosis",
    "gather_host_ints",
    "gather_reduce",
    "log_images",
    "log_to_loggers",
    "publish_callback_metrics",
    "record_history",
    "refuse_sharded",
    "trainer_all_gather",
    "warn_if_state_missing",
    "warn_unreadable_state",
]


#: How to run sharded training with thetascope (named in every refusal).
FSDP2_ADVICE = (
    "Use FSDP2 instead: Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, "
    "tensor_parallel_size=1)) with torch.distributed.fsdp.fully_shard applied to each block in "
    "LightningModule.configure_model"
)


def _tensor_parallel_size(strategy: Any) -> int:
    mesh = getattr(strategy, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh is not None and "tensor_parallel" in names:
        return int(mesh["tensor_parallel"].size())
    size = getattr(strategy, "_tensor_parallel_size", 1)
    return size if isinstance(size, int) else 1


def refuse_sharded(trainer: pl.Trainer, owner: str, what: str, *, fsdp2: bool = False) -> None:
    """Raise ``RuntimeError`` at setup under a strategy whose shards ``owner`` cannot turn into full values.

    Refused, each with the reason in the message: ``FSDPStrategy`` (FSDP1: it flattens a module's parameters
    into one ``FlatParameter`` and shards that flat vector, so outside the forward a rank holds 1-D
    fragments that are neither whole parameters nor rows of them), ``DeepSpeedStrategy`` (ZeRO partitions
    flattened parameter and gradient buffers inside DeepSpeed's engine), ``ModelParallelStrategy`` with a
    tensor-parallel size above 1 (parameters split along other dimensions, attention heads spread over
    ranks). Accepted: ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` (FSDP2 data-parallel sharding
    over ``DTensor``) when ``fsdp2`` is true, i.e. when the caller reduces shards through
    :mod:`thetascope.functional.sharding`; with ``fsdp2=False`` it is refused too. A per-rank number there
    would be the norm of a shard, reported as if it were the parameter's: never silently.
    """
    strategy = trainer.strategy
    names = [cls.__name__ for cls in type(strategy).__mro__]
    local = (
        f"each rank holds only a shard of every {what}, and a norm computed from it would be the norm of a "
        "shard, not of the full parameter"
    )
    if "DeepSpeedStrategy" in names:
        raise RuntimeError(
            f"{owner} does not support DeepSpeedStrategy: ZeRO partitions flattened parameter and gradient "
            f"buffers inside the DeepSpeed engine, so {local}. {FSDP2_ADVICE}, or use strategy='ddp'."
        )
    if "FSDPStrategy" in names:
        raise RuntimeError(
            f"{owner} does not support FSDPStrategy (FSDP1): it flattens each wrapped module's parameters "
            "into one FlatParameter and shards that flat vector, so outside the forward a rank holds 1-D "
            "fragments that are neither whole parameters nor rows of them; per-layer gradient norms and "
            "spectral norms of the attention projections cannot be formed from them without gathering. "
            f"{FSDP2_ADVICE}: FSDP2 keeps every parameter a row-sharded DTensor, which thetascope reduces "
            "exactly."
        )
    if "ModelParallelStrategy" in names:
        tp = _tensor_parallel_size(strategy)
        if tp > 1:
            raise RuntimeError(
                f"{owner} does not support tensor parallelism (ModelParallelStrategy with "
                f"tensor_parallel_size={tp}): parameters are split along their input or output dimension "
                "and attention heads live on different ranks, so per-head attention statistics and spectral "
                f"norms would be those of slices. {FSDP2_ADVICE}."
            )
        if not fsdp2:
            raise RuntimeError(
                f"{owner} does not support ModelParallelStrategy: {local}, and this callback does not reduce "
                "shards. Use strategy='ddp', or remove the callback for sharded runs."
            )


def trainer_all_gather(trainer: pl.Trainer) -> AllGather:
    """The :data:`~thetascope.monitors._collective.AllGather` of ``trainer``'s strategy."""

    def gather(vec: Tensor) -> Tensor:
        if trainer.world_size <= 1:
            return vec.unsqueeze(0)
        return trainer.strategy.all_gather(vec).reshape(trainer.world_size, -1)

    return gather


def gather_reduce(trainer: pl.Trainer, packed: PackedValues, device: torch.device | None = None) -> Tensor:
    """:func:`~thetascope.monitors._collective.reduce_packed` over ``trainer``'s ranks (one collective)."""
    return reduce_packed(packed, trainer_all_gather(trainer), device)


def log_to_loggers(
    trainer: pl.Trainer,
    metrics: Mapping[str, float],
    step: int,
    mode: str = "all",
    prefix: str = DEFAULT_PREFIX,
) -> None:
    """Write scalars to every attached logger at ``step``, from global rank zero only.

    We write to the loggers directly (not through ``LightningModule.log``) so the values land at exactly the
    measured optimizer step whatever ``log_every_n_steps`` is, and so no metric reduction is added on top of
    ours. With ``mode="summary"`` only the headline keys are written; every value is still kept (host floats,
    thinned on long runs: :class:`~thetascope.report.diagnosis.MeasuredHistory`) for the diagnosis at fit
    end.
    """
    if not metrics or not trainer.is_global_zero:
        return
    record_history(trainer, metrics, step)
    write_scalars(trainer.loggers, headline_only(metrics, prefix) if mode == "summary" else metrics, step)


# What the callbacks of one Trainer logged, for the diagnosis at fit end (rank zero; weak: dies with the
# Trainer), and the diagnosis already given for it with the history size it was computed from.
_histories: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_diagnosed: weakref.WeakKeyDictionary[Any, tuple[int, Any]] = weakref.WeakKeyDictionary()


def record_history(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Keep ``metrics`` at ``step`` in the trainer's history (what :func:`fit_end_diagnosis` reads)."""
    hist = _histories.get(trainer)
    if hist is None:
        from thetascope.report.diagnosis import MeasuredHistory

        hist = _histories[trainer] = MeasuredHistory()
    hist.add(step, metrics)


def fit_end_diagnosis(trainer: pl.Trainer, prefix: str = DEFAULT_PREFIX) -> Any:
    """The :class:`~thetascope.report.diagnosis.Diagnosis` of what this trainer's callbacks logged.

    Rank zero only (None elsewhere, and when nothing was logged). Every thetascope callback calls it at fit
    end; the table is computed and written to the console log once per fit, the later callers get the same
    object.
    """
    if not trainer.is_global_zero:
        return None
    hist = _histories.get(trainer)
    if hist is None or not len(hist):
        return None
    marker = len(hist)
    done = _diagnosed.get(trainer)
    if done is not None and done[0] == marker:
        return done[1]
    from lightning.pytorch.utilities import rank_zero_info

    hist.prefix = prefix
    diagnosis = hist.diagnose(run=type(trainer.lightning_module).__name__)
    _diagnosed[trainer] = (marker, diagnosis)
    rank_zero_info(diagnosis.text())
    return diagnosis


def publish_callback_metrics(
    trainer: pl.Trainer, metrics: Mapping[str, float], prog_bar: bool = False
) -> None:
    """Put values into ``trainer.callback_metrics`` (what EarlyStopping/ModelCheckpoint read), on every rank.

    The values are already reduced across ranks, so every rank sees the same number (monitors agree).
    """
    cb = trainer.callback_metrics
    for k, v in metrics.items():
        cb[k] = torch.tensor(float(v))
    if prog_bar:
        pb = trainer.progress_bar_metrics
        for k, v in metrics.items():
            pb[k] = float(v)


def log_images(trainer: pl.Trainer, images: Mapping[str, Any], step: int) -> int:
    """Send HWC uint8 images to the loggers that take images (TensorBoard, W&B, MLflow); returns how many.

    Rank zero only; each logger through its own API (see :mod:`thetascope.callbacks._loggers`), at most once
    per ``trainer.log_every_n_steps`` steps per tag. A logger that takes no images (CSV) is warned about once.
    """
    if not images or not trainer.is_global_zero:
        return 0
    from lightning.pytorch.utilities import rank_zero_warn

    every = int(getattr(trainer, "log_every_n_steps", 1) or 1)
    return write_images(trainer.loggers, images, step, every=every, warn=rank_zero_warn)


def warn_if_state_missing(callback: Any, checkpoint: Mapping[str, Any]) -> None:
    """Warn when ``checkpoint`` holds no state for ``callback`` (written without it, or other settings)."""
    states = checkpoint.get("callbacks") or {}
    keys = {callback.state_key, getattr(callback, "_legacy_state_key", None)}
    if not any(k in states for k in keys if k is not None):
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"{type(callback).__name__}: the checkpoint holds no state for this callback (it was written "
            "without it, or with other settings); its statistics start fresh.",
            category=UserWarning,
        )


def warn_unreadable_state(owner: str, err: BaseException) -> None:
    """Warn that a checkpoint's state for ``owner`` could not be read (an older or foreign layout)."""
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"{owner}: could not read its state from the checkpoint ({type(err).__name__}: {err}); the layout "
        "may be from another version. Its statistics start fresh.",
        category=UserWarning,
    )


def gather_host_ints(trainer: pl.Trainer, values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank) with one collective; ``[values]`` in one process.

    For setup-time agreement only (it syncs); every rank must call it.
    """
    if trainer.world_size <= 1:
        return [list(values)]
    vec = torch.tensor(list(values), dtype=torch.float32, device=trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(vec).reshape(trainer.world_size, -1)
    return [[int(v) for v in row] for row in gathered.cpu().tolist()]


class StateCheckedCallback(Callback):
    """A callback that warns when a checkpoint it resumes from holds no state for it."""

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        warn_if_state_missing(self, checkpoint)


class DiagnosedCallback(StateCheckedCallback):
    """A measuring callback with ``every_n_steps``, ``log="all"|"summary"`` and the diagnosis at fit end."""

    prefix: str

    def _init_schedule(self, every_n_steps: Any, log: Any) -> None:
        """Validate and keep ``log`` and ``every_n_steps``; no diagnosis yet."""
        self.log_mode = check_choice("log", log, LOG_MODES)
        #: The diagnosis of the run, set at fit end on global rank zero (None elsewhere).
        self.diagnosis: Any = None
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.diagnosis = fit_end_diagnosis(trainer, self.prefix)
