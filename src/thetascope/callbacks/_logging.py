"""Shared plumbing of the thetascope callbacks: keys, layer subsets, one-collective reduction, logging,
heatmaps.

Nothing here runs on unmeasured steps; every function may sync (it is only called on measurement steps).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "REDUCE_OPS",
    "FailureGuard",
    "HeatmapHistory",
    "PackedValues",
    "check_layers_arg",
    "check_positive_int",
    "check_prefix",
    "gather_host_ints",
    "gather_reduce",
    "layer_key",
    "log_images",
    "log_to_loggers",
    "publish_callback_metrics",
    "refuse_sharded",
    "select_layers",
    "shared_probe",
    "unwrap_compiled",
    "warn_if_state_missing",
    "warn_unreadable_state",
]

#: Cross-rank reductions understood by :func:`gather_reduce`.
REDUCE_OPS: tuple[str, ...] = ("mean", "max", "sum", "min")
_OP_CODE = {op: i for i, op in enumerate(REDUCE_OPS)}


# ------------------------------------------------------------------------------------------------------------
# ----
# argument validation (ValueError naming the argument and the allowed values)
# ------------------------------------------------------------------------------------------------------------
# ----
def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an ``int >= minimum`` (bools refused), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_prefix(prefix: Any) -> str:
    """Validate a key prefix (a string; ``""`` allowed)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string such as 'stability/', got {prefix!r}")
    return prefix


def check_layers_arg(layers: Any) -> str | list[int]:
    """Validate ``layers=``: ``None``/``"all"``, ``"auto"`` or a list of non-negative layer indices."""
    if layers is None or layers == "all":
        return "all"
    if layers == "auto":
        return "auto"
    if isinstance(layers, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
    ):
        return sorted(set(int(i) for i in layers))
    raise ValueError(
        f"layers must be 'all' (or None), 'auto', or a list of layer indices >= 0, got {layers!r}"
    )


def select_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Indices of the layers to log out of ``n_layers``.

    ``"all"`` gives every layer; ``"auto"`` the first, second, middle, second-last and last (deduplicated);
    a list is kept as given, and indices ``>= n_layers`` raise ``ValueError``.

    Example:
        >>> select_layers("auto", 12), select_layers("auto", 2), select_layers([0, 3], 4)
        ([0, 1, 6, 10, 11], [0, 1], [0, 3])
    """
    if spec == "all":
        return list(range(n_layers))
    if spec == "auto":
        return sorted({i for i in (0, 1, n_layers // 2, n_layers - 2, n_layers - 1) if 0 <= i < n_layers})
    chosen = [int(i) for i in spec]
    bad = [i for i in chosen if i >= n_layers]
    if bad:
        raise ValueError(
            f"layers={list(spec)} names layer(s) {bad} but the model has {n_layers} (0..{n_layers - 1})"
        )
    return chosen


def layer_key(prefix: str, name: str, index: int) -> str:
    """``{prefix}{name}/layer_{index:02d}``, e.g. ``stability/theta_max/layer_03``.

    Example:
        >>> layer_key("stability/", "theta_max", 3)
        'stability/theta_max/layer_03'
    """
    return f"{prefix}{name}/layer_{index:02d}"


# ------------------------------------------------------------------------------------------------------------
# ----
# strategy / model helpers
# ------------------------------------------------------------------------------------------------------------
# ----
def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The eager module behind a ``torch.compile`` wrapper (``_orig_mod``), or ``module`` itself."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def refuse_sharded(trainer: pl.Trainer, owner: str, what: str) -> None:
    """Raise ``RuntimeError`` under strategies that shard parameters (FSDP, DeepSpeed, ModelParallel).

    Per-rank gradient and weight norms there are norms of shards: reporting them would be silently wrong.
    """
    strategy = trainer.strategy
    names = [cls.__name__ for cls in type(strategy).__mro__]
    sharded = [n for n in names if n in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")]
    if sharded:
        raise RuntimeError(
            f"{owner} does not support {sharded[0]}: parameters are sharded across ranks, so each rank "
            f"sees only a shard of every {what} and the norms it could report would be norms of shards, not "
            "of the full "
            "parameters. Use DDP (strategy='ddp'), or remove the callback for sharded runs."
        )


# ------------------------------------------------------------------------------------------------------------
# ----
# one collective per measurement
# ------------------------------------------------------------------------------------------------------------
# ----
class PackedValues:
    """Named 0-dim / 1-dim tensors packed into one flat float32 vector, with a reduction op per entry.

    Build it on every rank in the same order (the layout must match across ranks), call :func:`gather_reduce`
    once, then :meth:`unpack` the result.

    Example:
        >>> p = PackedValues()
        >>> p.add("a", torch.tensor(1.0), "max"); p.add("b", torch.tensor([2.0, 3.0]), "mean")
        >>> p.unpack(p.vector())["b"].tolist()
        [2.0, 3.0]
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._shapes: list[tuple[int, ...]] = []
        self._values: list[Tensor] = []
        self._ops: list[int] = []

    def add(self, name: str, value: Tensor | float, op: str = "mean") -> None:
        """Append ``value`` (any shape, flattened) under ``name``, reduced across ranks with ``op``."""
        if op not in _OP_CODE:
            raise ValueError(f"op must be one of {list(REDUCE_OPS)}, got {op!r}")
        t = value if isinstance(value, Tensor) else torch.tensor(float(value))
        self._names.append(name)
        self._shapes.append(tuple(t.shape))
        self._values.append(t.detach().reshape(-1).float())
        self._ops.extend([_OP_CODE[op]] * t.numel())

    def __len__(self) -> int:
        return len(self._ops)

    def vector(self, device: torch.device | None = None) -> Tensor:
        """The flat float32 vector (on ``device``, or the first value's device)."""
        if not self._values:
            return torch.zeros(0, device=device)
        dev = device if device is not None else self._values[0].device
        return torch.cat([v.to(dev) for v in self._values])

    def ops(self) -> Tensor:
        """Op code per entry (index into :data:`REDUCE_OPS`)."""
        return torch.tensor(self._ops, dtype=torch.long)

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a reduced vector back into the named tensors (original shapes)."""
        out: dict[str, Tensor] = {}
        start = 0
        for name, shape in zip(self._names, self._shapes):
            n = math.prod(shape)
            out[name] = flat[start : start + n].reshape(shape)
            start += n
        return out


def _reduce_gathered(gathered: Tensor, ops: Tensor) -> Tensor:
    """Reduce ``[world, K]`` per column; mean/max/min ignore NaN (NaN only if every rank is NaN)."""
    nan = torch.isnan(gathered)
    all_nan = nan.all(0)
    mean = torch.nanmean(gathered, dim=0)
    mx = gathered.masked_fill(nan, -math.inf).amax(0)
    mn = gathered.masked_fill(nan, math.inf).amin(0)
    sm = gathered.sum(0)
    ops = ops.to(gathered.device)
    out = torch.where(ops == 0, mean, torch.where(ops == 1, mx, torch.where(ops == 2, sm, mn)))
    return torch.where(all_nan & (ops != 2), torch.full_like(out, math.nan), out)


def gather_reduce(trainer: pl.Trainer, packed: PackedValues, device: torch.device | None = None) -> Tensor:
    """Reduce a :class:`PackedValues` across ranks with ONE collective and return the reduced vector (CPU).

    A single ``all_gather`` of the packed vector lets every entry use its own op (mean, max, min or sum) —
    an ``all_reduce`` would need one collective per op. In a single process it is a no-op. Every rank must
    call
    this with the same layout; it syncs the host (measurement steps only).
    """
    vec = packed.vector(device)
    if trainer.world_size > 1:
        gathered = trainer.strategy.all_gather(vec)
        gathered = gathered.reshape(trainer.world_size, -1)
    else:
        gathered = vec.unsqueeze(0)
    return _reduce_gathered(gathered.detach().float().cpu(), packed.ops())


# ------------------------------------------------------------------------------------------------------------
# ----
# logging
# ------------------------------------------------------------------------------------------------------------
# ----
def log_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write scalars to every attached logger at ``step``, from global rank zero only.

    We write to the loggers directly (not through ``LightningModule.log``) so the values land at exactly the
    measured optimizer step whatever ``log_every_n_steps`` is, and so no metric reduction is added on top of
    ours.
    """
    if not metrics or not trainer.is_global_zero:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


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


class HeatmapHistory:
    """Per-layer values over measurement steps (host memory, bounded), rendered as a layer x step image.

    Example:
        >>> h = HeatmapHistory(max_steps=4)
        >>> for s in range(6):
        ...     h.append(s, [0.1 * s, 0.2, 0.3])
        >>> h.image(cell=2).shape
        (6, 8, 3)
    """

    def __init__(self, max_steps: int = 256, log_scale: bool = False) -> None:
        self.max_steps = max_steps
        self.log_scale = log_scale
        self.steps: list[int] = []
        self.rows: list[list[float]] = []

    def append(self, step: int, values: Iterable[float]) -> None:
        """Add one column (one value per layer)."""
        self.steps.append(int(step))
        self.rows.append([float(v) for v in values])
        if len(self.steps) > self.max_steps:
            del self.steps[0], self.rows[0]

    def image(self, cell: int = 4) -> Any:
        """``uint8`` HWC RGB image, layers as rows (layer 0 on top), steps as columns; NaN drawn black."""
        import numpy as np

        arr = np.asarray(self.rows, dtype=np.float64).T  # [layers, steps]
        if self.log_scale:
            with np.errstate(divide="ignore", invalid="ignore"):
                arr = np.log10(np.where(arr > 0, arr, np.nan))
        finite = np.isfinite(arr)
        if finite.any():
            lo, hi = float(arr[finite].min()), float(arr[finite].max())
            scaled = (arr - lo) / (hi - lo) if hi > lo else np.full_like(arr, 0.5)
        else:
            scaled = np.zeros_like(arr)
        scaled = np.clip(np.where(finite, scaled, 0.0), 0.0, 1.0)
        try:
            from matplotlib import colormaps

            rgb = colormaps["viridis"](scaled)[..., :3]
        except Exception:  # matplotlib is optional: grayscale
            rgb = np.repeat(scaled[..., None], 3, axis=-1)
        rgb = np.where(finite[..., None], rgb, 0.0)
        img = (rgb * 255).round().astype(np.uint8)
        return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


def log_images(trainer: pl.Trainer, images: Mapping[str, Any], step: int) -> int:
    """Send HWC uint8 images to loggers that take images (TensorBoard, W&B); returns how many were written.

    Rank zero only. Loggers without image support (CSV) are skipped silently.
    """
    if not images or not trainer.is_global_zero:
        return 0
    written = 0
    for logger in trainer.loggers:
        kind = type(logger).__name__
        try:
            if kind == "TensorBoardLogger":
                exp = logger.experiment  # type: ignore[attr-defined]
                for tag, img in images.items():
                    exp.add_image(tag, img, global_step=step, dataformats="HWC")
                    written += 1
            elif kind == "WandbLogger":
                for tag, img in images.items():
                    logger.log_image(key=tag, images=[img], step=step)  # type: ignore[attr-defined]
                    written += 1
        except Exception as err:  # an image is never worth breaking training for
            warnings.warn(f"thetascope: could not log heatmap images to {kind}: {err}", stacklevel=2)
    return written


# ------------------------------------------------------------------------------------------------------------
# ----
# never break training
# ------------------------------------------------------------------------------------------------------------
# ----
class FailureGuard:
    """Tracks measurements that failed; warns once per measurement and keeps every rank's layout identical.

    A failure is first recorded locally (``failed_now``); the callback packs one flag per measurement into its
    collective, and :meth:`disable_agreed` disables on every rank what failed on any rank, so ranks never
    disagree about which collectives they call. ``strict=True`` re-raises instead.
    """

    def __init__(self, owner: str, strict: bool) -> None:
        self.owner = owner
        self.strict = strict
        self.disabled: set[str] = set()
        self.failed_now: set[str] = set()
        self._warned: set[str] = set()

    def fail(self, name: str, err: BaseException, rank: int = 0) -> None:
        """Record a local failure of measurement ``name`` (re-raises under ``strict``)."""
        self._report(
            name,
            err,
            f"measurement {name!r} failed on rank {rank} ({type(err).__name__}: {err}); it is disabled for "
            "the rest of training",
        )
        self.failed_now.add(name)

    def warn(self, name: str, err: BaseException, rank: int = 0) -> None:
        """Report a failure that needs no agreement across ranks, without disabling anything.

        For the host-side arithmetic and logging that follow the reduction: every rank has already taken part
        in the collective, so the next measurement runs normally. Warns once per ``name``; ``strict``
        re-raises.
        """
        self._report(
            name,
            err,
            f"{name} failed on rank {rank} ({type(err).__name__}: {err}); the values of this measurement "
            "were not logged there",
        )

    def _report(self, name: str, err: BaseException, what: str) -> None:
        """Re-raise under ``strict``; otherwise warn once per ``name``."""
        if self.strict:
            raise err
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"{self.owner}: {what} (pass strict=True to raise instead).", RuntimeWarning, stacklevel=3
            )

    def disable_agreed(self, names: Iterable[str]) -> None:
        """Disable measurements that failed on some rank (after the reduction), on every rank."""
        for name in names:
            self.disabled.add(name)
        self.failed_now.clear()

    def active(self, name: str) -> bool:
        """Whether ``name`` is still measured."""
        return name not in self.disabled


# ------------------------------------------------------------------------------------------------------------
# ----
# one probe per model, shared by the callbacks
# ------------------------------------------------------------------------------------------------------------
# ----
# model -> weak reference to its probe. The callbacks hold the probe; the probe holds the model. Holding the
# probe strongly here would keep every model ever fitted alive for the life of the process (the value would
# reference its own weak key), which a sweep or a notebook running many fits would notice.
_PROBES: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def shared_probe(module: torch.nn.Module, **settings: Any) -> Any:
    """The :class:`~thetascope.capture.AttentionProbe` of ``module`` (compiled wrappers unwrapped), made once.

    TemperatureWarmup and AttentionSensitivityMonitor use the same probe, so the measured rows are those of
    the
    tempered logits and only one set of hooks is ever installed. ``settings`` (``rows_per_head``,
    ``batch_size``, ``exact_top``, ``seed``) update the sampling of an existing probe; they do not affect the
    temperature.
    """
    from thetascope.capture.probe import AttentionProbe

    key = unwrap_compiled(module)
    ref = _PROBES.get(key)
    probe = ref() if ref is not None else None
    if probe is None:
        probe = AttentionProbe(key, **settings)
        _PROBES[key] = weakref.ref(probe)
    else:
        probe = _refreshed(key, probe)
        for name, value in settings.items():
            setattr(probe, name, value)
    return probe


def _refreshed(model: torch.nn.Module, probe: Any) -> Any:
    """``probe``, or a new probe when the model's attention modules changed since it was built.

    Blocks added, removed or replaced between two ``fit`` calls would otherwise go unmeasured, or keep
    reporting the last values of a module that is gone. The new probe keeps the sampling settings and tau.
    """
    from thetascope.capture.probe import AttentionProbe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # discovery warnings were given when the first probe was built
        try:
            fresh = AttentionProbe(
                model,
                rows_per_head=probe.rows_per_head,
                heads=probe.heads,
                batch_size=probe.batch_size,
                seed=probe.seed,
                exact_top=probe.exact_top,
            )
        except ValueError:  # no attention left, or heads= no longer fits: keep the old probe
            return probe
    same = [(r.index, c.adapter.module) for r, c in zip(fresh.layers, fresh._contexts)] == [
        (r.index, c.adapter.module) for r, c in zip(probe.layers, probe._contexts)
    ]
    if same:
        return probe
    tau = probe.temperature
    probe.remove()
    if tau != 1.0:
        fresh.set_temperature(tau)
    _PROBES[model] = weakref.ref(fresh)
    return fresh


# ------------------------------------------------------------------------------------------------------
# checkpoints and ranks
# ------------------------------------------------------------------------------------------------------
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
