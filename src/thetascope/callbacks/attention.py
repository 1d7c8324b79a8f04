"""AttentionSensitivityMonitor: theta brackets, B-bar, projection norms and sensitivity per layer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from thetascope._validation import check_layers_arg, check_positive_int, check_prefix, select_layers
from thetascope.callbacks._lightning import (
    fit_end_diagnosis,
    gather_host_ints,
    gather_reduce,
    log_images,
    log_to_loggers,
    publish_callback_metrics,
    refuse_sharded,
    warn_if_state_missing,
    warn_unreadable_state,
)
from thetascope.capture.registry import shared_probe
from thetascope.keys import LOG_MODES, layer_key
from thetascope.monitors._collective import PackedValues
from thetascope.monitors._guard import FailureGuard
from thetascope.report.heatmap import HeatmapHistory

__all__ = ["AttentionSensitivityMonitor"]

# (name, cross-rank op) of the per-layer values packed into the one collective, in pack order.
_LAYER_FIELDS: tuple[tuple[str, str], ...] = (
    ("theta_max", "max"),
    ("theta_max_lower", "max"),
    ("theta_sum_mid", "sum"),
    ("theta_n_valid", "sum"),
    ("theta_n_ge_099", "sum"),
    ("theta_p10", "mean"),
    ("theta_width", "max"),
    ("entropy_sum", "sum"),
    ("attn_input_max_norm", "max"),
    ("residual_max_norm", "max"),
    ("nonfinite_rows", "sum"),
    ("proj_norm", "max"),
    ("lipschitz_bound", "max"),
    ("failed", "max"),
)
_RESIDUAL_SCALE_ATTRS = (
    "scale",
    "alpha",
    "branch_scale",
    "residual_scale",
    "res_scale",
    "layer_scale",
    "gamma",
)


def _nanmax(x: Tensor) -> Tensor:
    finite = torch.isfinite(x)
    return torch.where(finite, x, -math.inf).amax() if x.numel() else torch.tensor(-math.inf)


def _finite_or_nan(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, math.nan)


class AttentionSensitivityMonitor(Callback):
    """Measure the attention of the current training batch every ``every_n_steps`` optimizer steps.

    On a measurement step (``global_step % every_n_steps == 0``, counted in optimizer steps, so never on a
    gradient-accumulation micro-step; the first micro-batch of that step is the one observed) the training
    forward runs inside :meth:`AttentionProbe.capture` — on every other step no hook is installed and nothing
    is added. Right after that forward (before the backward) the callback computes, per attention layer:

    * the certified theta bracket of ``rows_per_head`` sampled query rows per head: max of the upper and lower
      bounds, mean of the midpoints, fraction of rows with lower bound >= 0.99, 10th percentile, widest
      bracket;
    * the mean attention entropy;
    * both B-bar readings: ``attn_input_max_norm`` (largest token 2-norm of the attention input, the quantity
      of
      Theorem 5.1) and ``residual_max_norm`` (the residual stream entering the block, as in the paper's
      experiments);
    * ``G_l`` (product of the spectral norms of W_Q, W_K, W_V, W_O) and per-head spectral norms, all from ONE
      :class:`~thetascope.functional.spectral.SpectralNormEstimator` call whose power-iteration vectors
      persist
      across measurements (and checkpoints);
    * ``S_l = (theta_max / tau) * B^2 * G_l`` with ``B = attn_input_max_norm``, and the Theorem 5.1 MHA bound;
    * the current temperature ``tau`` (from a :class:`TemperatureWarmup` on the same model, else 1).

    All values of one measurement are packed into a single vector and reduced across ranks with ONE collective
    (an ``all_gather``, so maxes, sums and means come out of the same call), then logged from rank zero at
    ``step = global_step``. ``{prefix}theta_max`` and ``{prefix}sensitivity_max`` (max over layers) also go to
    ``trainer.callback_metrics`` for ``EarlyStopping``/``ModelCheckpoint``. An architecture card (depth N,
    norm
    placement, path length m, the ``N^(-1/m)`` scale, residual scaling if detectable) is logged as
    hyperparameters at the first measurement.

    Args:
        every_n_steps: measure every this many optimizer steps (>= 1).
        rows_per_head: query rows sampled per (batch item, head).
        exact_top: entries enumerated exactly by the theta bracket (1..20).
        layers: which layers' per-layer keys to log: ``"all"``/``None``, ``"auto"`` (first, second, middle,
            second-last, last) or a list of layer indices. Headline maxima always cover every layer.
        batch_size: measure only the first ``batch_size`` items of the batch (``None`` = all).
        power_iters: power-iteration steps per measurement (``None`` = the estimator's default).
        prefix: key prefix.
        prog_bar: also show the headline values in the progress bar.
        log_heatmap: log layer x step heatmaps of theta_max and sensitivity to loggers that take images.
        strict: raise on a failed measurement instead of warning once and disabling it.
        log: ``"all"`` logs every key, ``"summary"`` only the headline keys (``theta_max``,
            ``sensitivity_max``, ``grad_norm_global``). Either way the diagnosis at fit end (printed on rank
            zero, kept in ``self.diagnosis``) reads every value.

    Example:
        >>> from thetascope.callbacks import AttentionSensitivityMonitor
        >>> cb = AttentionSensitivityMonitor(every_n_steps=100, layers="auto")
        >>> cb.state_key
        "AttentionSensitivityMonitor{'every_n_steps': 100, 'prefix': 'stability/', 'rows_per_head': 64}"
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        rows_per_head: int = 64,
        exact_top: int = 10,
        layers: str | list[int] | None = None,
        batch_size: int | None = None,
        power_iters: int | None = None,
        prefix: str = "stability/",
        prog_bar: bool = False,
        log_heatmap: bool = True,
        strict: bool = False,
        log: str = "all",
    ) -> None:
        super().__init__()
        if log not in LOG_MODES:
            raise ValueError(f"log must be one of {LOG_MODES}, got {log!r}")
        self.log_mode = log
        #: The diagnosis of the run, set at fit end on global rank zero (None elsewhere).
        self.diagnosis: Any = None
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.rows_per_head = check_positive_int("rows_per_head", rows_per_head)
        if isinstance(exact_top, bool) or not isinstance(exact_top, int) or not 1 <= exact_top <= 20:
            raise ValueError(f"exact_top must be an integer in 1..20, got {exact_top!r}")
        self.exact_top = exact_top
        self.layers = check_layers_arg(layers)
        self.batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        self.power_iters = None if power_iters is None else check_positive_int("power_iters", power_iters)
        self.prefix = check_prefix(prefix)
        for name, flag in (("prog_bar", prog_bar), ("log_heatmap", log_heatmap), ("strict", strict)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.prog_bar = prog_bar
        self.log_heatmap = log_heatmap
        self.strict = strict

        from thetascope.functional.spectral import SpectralNormEstimator

        self.estimator = (
            SpectralNormEstimator()
            if power_iters is None
            else SpectralNormEstimator(n_iter=self.power_iters or 1)
        )
        self.guard = FailureGuard(type(self).__name__, strict)
        self.probe: Any = None
        self._stack: contextlib.ExitStack | None = None
        self._pending_step = -1
        self._last_step = -1
        self._card_logged = False
        self._heat_theta = HeatmapHistory()
        self._heat_sens = HeatmapHistory(log_scale=True)
        self.last_values: dict[str, float] = {}
        self._restored_captures: int | None = None
        self._captures_before: dict[int, int] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, prefix=self.prefix, rows_per_head=self.rows_per_head
        )

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, type(self).__name__, "projection weight")
        if self.guard.active("probe"):
            try:
                # on every fit: shared_probe rebuilds the probe when attention modules were added or removed
                self.probe = shared_probe(
                    pl_module,
                    rows_per_head=self.rows_per_head,
                    batch_size=self.batch_size,
                    exact_top=self.exact_top,
                )
            except Exception as err:
                self.guard.fail("probe", err, trainer.global_rank)
                self.probe = None
        n_layers = len(self.probe.layers) if self.probe is not None and self.guard.active("probe") else -1
        # every rank must pack the same layout into each collective: agree once, here, on the probe depth
        counts = [row[0] for row in gather_host_ints(trainer, [n_layers])]
        if len(set(counts)) > 1 or -1 in counts:
            if -1 not in counts:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"{type(self).__name__}: ranks found different numbers of attention layers "
                    f"({dict(enumerate(counts))} by rank); attention measurements are disabled on every rank "
                    "(gradient monitoring and training go on).",
                    category=RuntimeWarning,
                )
            self.guard.disable_agreed(["probe"])
        elif n_layers >= 0:  # after the agreement, so that every rank gets here or none does
            select_layers(self.layers, n_layers)  # a bad layers= is a configuration error: raise it now
        self._restore_captures()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.diagnosis = fit_end_diagnosis(trainer, self.prefix)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_capture()

    def _is_measurement_step(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and step != self._last_step

    # ------------------------------------------------------------------------------------------------ capture
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.probe is None or not self.guard.active("probe") or not self._is_measurement_step(step):
            return
        if self._stack is not None:  # a capture left open (e.g. an exception in the previous step)
            self._close_capture()
        stack = contextlib.ExitStack()
        try:
            if self._compiled(pl_module):
                # compiled graphs do not run module hooks: run this one measured forward eagerly instead
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            self._captures_before = {id(r): r.n_captures for r in self.probe.layers}
            stack.enter_context(self.probe.capture())
        except Exception as err:
            stack.close()
            self.guard.fail("capture", err, trainer.global_rank)
            # every rank must still call the collective for this step: measure with NaNs below
        else:
            self._stack = stack
        self._pending_step = step
        self._last_step = step

    @staticmethod
    def _compiled(pl_module: pl.LightningModule) -> bool:
        return any(type(m).__name__ == "OptimizedModule" for m in pl_module.modules())

    def _close_capture(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._finish(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        if self._pending_step < 0:
            return
        self._close_capture()
        step, self._pending_step = self._pending_step, -1
        self.measure(trainer, step)

    # ------------------------------------------------------------------------------------------------ math
    def _temperature(self) -> float:
        return 1.0 if self.probe is None else float(self.probe.temperature)

    def _layer_stats(self, rec: Any) -> dict[str, Tensor]:
        """Per-rank partial values of one layer (sums and counts, so the cross-rank mean is exact)."""
        theta = rec.theta
        if theta is None or rec.n_captures == self._captures_before.get(id(rec), -1):
            # the layer did not run in the measured forward (or its kernel was not seen): nothing to report,
            # and no stale values from an earlier capture
            device = rec.theta.lower.device if rec.theta is not None else torch.device("cpu")
            nan = torch.tensor(math.nan, device=device)
            empty = {f: nan for f, _ in _LAYER_FIELDS if f not in ("failed", "proj_norm", "lipschitz_bound")}
            zero = torch.zeros((), device=device)  # sums: a rank that saw nothing adds nothing
            empty.update(theta_sum_mid=zero, theta_n_valid=zero, theta_n_ge_099=zero, entropy_sum=zero)
            empty.update(nonfinite_rows=zero)  # no theta_head: no bound for a layer that did not run
            return empty
        lower, upper = theta.lower.float(), theta.upper.float()
        valid = torch.isfinite(lower) & torch.isfinite(upper)
        mid = torch.where(valid, 0.5 * (lower + upper), 0.0)
        n_valid = valid.sum().float()
        ent = rec.entropy.float() if rec.entropy is not None else torch.full_like(lower, math.nan)
        ent_valid = valid & torch.isfinite(ent)
        nan = torch.tensor(math.nan, device=lower.device)
        mids = mid[valid]
        p10 = torch.quantile(mids, 0.1) if mids.numel() else nan
        any_valid = n_valid > 0
        return {
            "theta_max": torch.where(any_valid, _nanmax(torch.where(valid, upper, -math.inf)), nan),
            "theta_max_lower": torch.where(any_valid, _nanmax(torch.where(valid, lower, -math.inf)), nan),
            "theta_sum_mid": mid.sum(),
            "theta_n_valid": n_valid,
            "theta_n_ge_099": (valid & (lower >= 0.99)).sum().float(),
            "theta_p10": p10,
            "theta_width": torch.where(any_valid, _nanmax(torch.where(valid, upper - lower, -math.inf)), nan),
            "entropy_sum": torch.where(ent_valid, ent, 0.0).sum(),
            # entropy is averaged over the rows where theta is valid (same rows)
            "attn_input_max_norm": rec.attn_input_max_norm.float()
            if rec.attn_input_max_norm is not None
            else nan,
            "residual_max_norm": rec.residual_max_norm.float() if rec.residual_max_norm is not None else nan,
            "nonfinite_rows": rec.n_nonfinite_rows.float() if rec.n_nonfinite_rows is not None else nan,
            # per-head theta max over (batch, rows): [H'] for Thm 5.1
            "theta_head": _finite_or_nan(torch.where(valid, upper, -math.inf).amax(dim=(0, 2)))
            if upper.dim() == 3
            else _nanmax(upper).reshape(1),
        }

    def _spectral(self) -> dict[str, Tensor]:
        """All projection norms of all layers in ONE estimator call (a batched power iteration per shape)."""
        mats: dict[str, Tensor] = {}
        for rec in self.probe.layers:
            if not self.guard.active(f"layer_{rec.index:02d}"):
                continue
            w = rec.weights()
            ph = w.per_head()
            i = rec.index
            mats[f"{i}/q"], mats[f"{i}/k"], mats[f"{i}/v"], mats[f"{i}/o"] = w.w_q, w.w_k, w.w_v, w.w_o
            mats[f"{i}/qh"], mats[f"{i}/kh"], mats[f"{i}/vh"] = ph["q"], ph["k"], ph["v"]
        return self.estimator(mats) if mats else {}

    def _bound(self, rec: Any, norms: Mapping[str, Tensor], theta_head: Tensor, b_bar: Tensor) -> Tensor:
        from thetascope.functional.sensitivity import mha_lipschitz_bound

        i = rec.index
        w = rec.weights()
        rep = w.n_heads // max(w.n_kv_heads, 1)
        k_h = norms[f"{i}/kh"].repeat_interleave(rep)
        v_h = norms[f"{i}/vh"].repeat_interleave(rep)
        q_h = norms[f"{i}/qh"]
        heads = rec.head_index
        if heads is not None and theta_head.numel() != q_h.numel():
            q_h, k_h, v_h = q_h[heads.cpu()], k_h[heads.cpu()], v_h[heads.cpu()]
        return mha_lipschitz_bound(
            theta_head, b_bar, norms[f"{i}/o"], q_h, k_h, v_h, head_dim=w.head_dim, tau=self._temperature()
        )

    # ------------------------------------------------------------------------------------------------ measure
    def measure(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """Compute, reduce (one collective) and log the values of the forward just captured."""
        rank = trainer.global_rank
        layers = list(self.probe.layers) if self.probe is not None else []
        device = next((p.device for p in trainer.lightning_module.parameters()), torch.device("cpu"))
        nan = torch.tensor(math.nan, device=device)
        packed = PackedValues()

        norms: dict[str, Tensor] = {}
        if self.guard.active("spectral"):
            try:
                with torch.no_grad():
                    norms = self._spectral()
            except Exception as err:
                self.guard.fail("spectral", err, rank)
                norms = {}
        packed.add("spectral_failed", float("spectral" in self.guard.failed_now), "max")

        for rec in layers:
            name = f"layer_{rec.index:02d}"
            vals: dict[str, Tensor] = {}
            if self.guard.active(name):
                try:
                    with torch.no_grad():
                        stats = self._layer_stats(rec)
                        theta_head = stats.pop("theta_head", None)
                        vals.update(stats)
                        i = rec.index
                        if norms:
                            from thetascope.functional.sensitivity import projection_norm_product

                            vals["proj_norm"] = projection_norm_product(
                                norms[f"{i}/q"], norms[f"{i}/k"], norms[f"{i}/v"], norms[f"{i}/o"]
                            )
                            if theta_head is not None:
                                vals["lipschitz_bound"] = self._bound(
                                    rec, norms, theta_head, stats["attn_input_max_norm"]
                                )
                except Exception as err:
                    self.guard.fail(name, err, rank)
                    vals = {}
            failed = name in self.guard.failed_now
            for field, op in _LAYER_FIELDS:
                if field == "failed":
                    packed.add(f"{name}/failed", float(failed), "max")
                elif failed:
                    packed.add(f"{name}/{field}", nan, op)
                else:
                    v = vals.get(field, nan)
                    packed.add(f"{name}/{field}", torch.as_tensor(v, device=device).float().reshape(()), op)

        reduced = packed.unpack(gather_reduce(trainer, packed, device))

        # failures anywhere disable the measurement everywhere (layouts stay equal across ranks)
        agreed = ["spectral"] if float(reduced["spectral_failed"]) > 0 else []
        agreed += [
            f"layer_{r.index:02d}" for r in layers if float(reduced[f"layer_{r.index:02d}/failed"]) > 0
        ]
        self.guard.disable_agreed(agreed)

        try:  # host-side arithmetic and logging after the collective: a failure here needs no agreement
            return self._log(trainer, step, layers, reduced)
        except Exception as err:
            self.guard.warn("logging", err, rank)
            return {}

    def _log(
        self, trainer: pl.Trainer, step: int, layers: list[Any], reduced: Mapping[str, Tensor]
    ) -> dict[str, float]:
        from thetascope.functional.sensitivity import sensitivity_proxy

        p = self.prefix
        tau = self._temperature()
        shown = set(select_layers(self.layers, len(layers))) if layers else set()
        metrics: dict[str, float] = {}
        theta_col: list[float] = []
        sens_col: list[float] = []
        theta_all: list[float] = []
        sens_all: list[float] = []
        for pos, rec in enumerate(layers):
            name = f"layer_{rec.index:02d}"
            if not self.guard.active(name):
                theta_col.append(math.nan)
                sens_col.append(math.nan)
                continue
            r = {f: float(reduced[f"{name}/{f}"]) for f, _ in _LAYER_FIELDS}
            n_valid = r["theta_n_valid"]
            values = {
                "theta_max": r["theta_max"],
                "theta_max_lower": r["theta_max_lower"],
                "theta_mean": r["theta_sum_mid"] / n_valid if n_valid > 0 else math.nan,
                "theta_frac_099": r["theta_n_ge_099"] / n_valid if n_valid > 0 else math.nan,
                "theta_p10": r["theta_p10"],
                "theta_width": r["theta_width"],
                "entropy": r["entropy_sum"] / n_valid if n_valid > 0 else math.nan,
                "attn_input_max_norm": r["attn_input_max_norm"],
                "residual_max_norm": r["residual_max_norm"],
                "nonfinite_rows": r["nonfinite_rows"],
                "proj_norm": r["proj_norm"],
                "lipschitz_bound": r["lipschitz_bound"],
            }
            sens = math.nan
            if all(math.isfinite(values[k]) for k in ("theta_max", "attn_input_max_norm", "proj_norm")):
                sens = float(
                    sensitivity_proxy(
                        torch.tensor(values["theta_max"]),
                        torch.tensor(values["attn_input_max_norm"]),
                        torch.tensor(values["proj_norm"]),
                        tau=tau,
                    )
                )
            values["sensitivity"] = sens
            theta_col.append(values["theta_max"])
            sens_col.append(sens)
            theta_all.append(values["theta_max"])
            sens_all.append(sens)
            if pos in shown:
                for key, v in values.items():
                    if math.isfinite(v):  # never NaN the log: missing readings are left out
                        metrics[layer_key(p, key, rec.index)] = v
        headline: dict[str, float] = {}
        finite_theta = [v for v in theta_all if math.isfinite(v)]
        finite_sens = [v for v in sens_all if math.isfinite(v)]
        if finite_theta:
            headline[f"{p}theta_max"] = max(finite_theta)
        if finite_sens:
            headline[f"{p}sensitivity_max"] = max(finite_sens)
        if not self._temperature_logged_elsewhere(trainer):
            metrics[f"{p}temperature"] = tau
        metrics.update(headline)
        log_to_loggers(trainer, metrics, step, self.log_mode, self.prefix)
        publish_callback_metrics(trainer, headline, prog_bar=self.prog_bar)
        if self.log_heatmap and layers:
            self._heat_theta.append(step, theta_col)
            self._heat_sens.append(step, sens_col)
            if trainer.is_global_zero and trainer.loggers:
                log_images(
                    trainer,
                    {
                        f"{p}theta_max/heatmap": self._heat_theta.image(),
                        f"{p}sensitivity/heatmap": self._heat_sens.image(),
                    },
                    step,
                )
        if not self._card_logged and layers:
            self._card_logged = True
            self._log_card(trainer, layers)
        self.last_values = metrics
        return metrics

    def _temperature_logged_elsewhere(self, trainer: pl.Trainer) -> bool:
        from thetascope.callbacks.temperature import TemperatureWarmup

        return any(
            isinstance(cb, TemperatureWarmup) and cb.log_temperature and cb.prefix == self.prefix
            for cb in getattr(trainer, "callbacks", [])
        )

    # ------------------------------------------------------------------------------------------------ card
    def architecture_card(self) -> dict[str, Any]:
        """Depth, norm placement, path length m, the recommended ``N^(-1/m)`` scale and residual scaling."""
        layers = list(self.probe.layers) if self.probe is not None else []
        n = len(layers)
        placements = sorted({str(r.norm_placement) for r in layers})
        try:
            ms = sorted({int(r.path_length_m) for r in layers})
        except Exception:
            ms = [4]
        m = ms[0] if ms else 4
        scales: set[str] = set()
        modules = dict(self.probe.model.named_modules()) if self.probe is not None else {}
        for rec in layers:
            block = modules.get(rec.block_name or "")
            for attr in _RESIDUAL_SCALE_ATTRS:
                v = getattr(block, attr, None) if block is not None else None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 1.0:
                    scales.add(f"{attr}={v:.4g}")
                elif isinstance(v, Tensor) and v.numel() == 1:
                    scales.add(f"{attr} (tensor)")
        return {
            "depth": n,
            "norm_placement": placements[0] if len(placements) == 1 else "mixed:" + "/".join(placements),
            "path_length_m": m,
            "recommended_scale": n ** (-1.0 / m) if n else math.nan,
            "residual_scaling": ", ".join(sorted(scales)) if scales else "not detected",
            "sensitivity_uses": "attn_input_max_norm",
        }

    def _log_card(self, trainer: pl.Trainer, layers: list[Any]) -> None:
        card = self.architecture_card()
        rank_zero_info(
            f"thetascope architecture card: N={card['depth']} attention layers, norm placement "
            f"{card['norm_placement']}, path length m={card['path_length_m']}, recommended per-map scale "
            f"N^(-1/m)={card['recommended_scale']:.4g}, residual scaling: {card['residual_scaling']}"
        )
        if trainer.is_global_zero:
            params = {f"{self.prefix}card/{k}": v for k, v in card.items()}
            for logger in trainer.loggers:
                with contextlib.suppress(Exception):
                    logger.log_hyperparams(params)

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "spectral": self.estimator.state_dict(),
            "last_step": self._last_step,
            "card_logged": self._card_logged,
            # the probe reseeds its row sampler from (seed, capture count): keep the count so a resumed run
            # samples the same rows as an uninterrupted one
            "probe_captures": self._probe_captures(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        warn_if_state_missing(self, checkpoint)

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            last_step = int(state_dict.get("last_step", -1))
            card_logged = bool(state_dict.get("card_logged", False))
            captures = state_dict.get("probe_captures")
            if captures is not None:
                captures = int(captures)
            self.estimator.load_state_dict(state_dict["spectral"])
        except Exception as err:  # an older or foreign layout: start fresh rather than stop the run
            warn_unreadable_state(type(self).__name__, err)
            self.estimator.reset()
            self._last_step, self._card_logged, self._restored_captures = -1, False, None
            return
        self._last_step, self._card_logged = last_step, card_logged
        self._restored_captures = captures
        self._restore_captures()

    def _probe_captures(self) -> int | None:
        if self.probe is not None:
            return self.probe.state_dict()["n_captures"]
        return self._restored_captures

    def _restore_captures(self) -> None:
        if self.probe is not None and self._restored_captures is not None:
            self.probe.load_state_dict({"n_captures": self._restored_captures})
            self._restored_captures = None
