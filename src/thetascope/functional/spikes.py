"""On-device spike detection against a median / MAD baseline refreshed every few steps; exact resume."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["MAD_TO_STD", "SpikeDetector"]

#: Scale that turns a median absolute deviation into a standard deviation for Gaussian data.
MAD_TO_STD = 1.4826


class SpikeDetector:
    """Flags upward spikes of a scalar series (loss, gradient norm) against a robust running baseline.

    The last ``window`` finite values live in a device ring buffer (NaN until filled). A value is a spike when
    ``value - median > threshold * 1.4826 * MAD`` against the baseline (median and MAD of the buffer), once at
    least ``min_history`` finite values were seen (one-sided: drops are not spikes). Non-finite values are
    always flagged and never enter the buffer; finite spikes do enter it, so a lasting level shift becomes the
    new baseline after about ``window / 2`` steps. The MAD is floored at ``1e-6 * |median|`` so a perfectly
    flat history does not flag rounding noise.

    The baseline is recomputed on every call of the first ``min_history`` and then on every
    ``refresh_every``-th call (default ``window // 10``: every 10th step for the default window), before the
    value of that call enters the buffer; calls in between reuse it. Two medians of the window on every step
    would dominate the per-step cost, while a median over ``window`` values moves little in a tenth of a
    window; ``refresh_every=1`` recomputes it every call. The schedule counts calls on the host, so it needs
    no sync.

    :meth:`update` never synchronises with the host (no ``.item()``, no branching on values). The state
    (buffer, position, counters, baseline) round-trips exactly through :meth:`state_dict` /
    :meth:`load_state_dict`, so a resumed run makes the same future decisions as an uninterrupted one.

    Args:
        window: ring-buffer length, an int >= 3.
        threshold: number of robust standard deviations above the median, a finite float > 0.
        min_history: finite values needed before anything finite is flagged, an int in [1, window].
        refresh_every: calls between baseline recomputations, an int >= 1 (``None``: ``window // 10``, at
            least 1).

    Raises:
        ValueError: naming the argument and its allowed range.

    Example:
        >>> det = SpikeDetector(window=8, threshold=3.0, min_history=4)
        >>> flags = [bool(det.update(torch.tensor(v))) for v in [1.0, 1.2, 0.9, 1.1, 1.05, 9.0, float("nan")]]
        >>> flags
        [False, False, False, False, False, True, True]
        >>> int(det.n_spikes), int(det.n_nonfinite)
        (2, 1)
    """

    def __init__(
        self,
        window: int = 100,
        threshold: float = 6.0,
        min_history: int = 20,
        *,
        refresh_every: int | None = None,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise ValueError(f"SpikeDetector: window must be an int >= 3, got {window!r}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or threshold <= 0
        ):
            raise ValueError(f"SpikeDetector: threshold must be a finite float > 0, got {threshold!r}")
        if (
            isinstance(min_history, bool)
            or not isinstance(min_history, int)
            or not 1 <= min_history <= window
        ):
            raise ValueError(
                f"SpikeDetector: min_history must be an int in [1, window={window}], got {min_history!r}"
            )
        if refresh_every is None:
            refresh_every = max(1, window // 10)
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(
                f"SpikeDetector: refresh_every must be an int >= 1 or None, got {refresh_every!r}"
            )
        self.window = window
        self.threshold = float(threshold)
        self.min_history = min_history
        self.refresh_every = refresh_every
        self._init_state(torch.device("cpu"))

    def _init_state(self, device: torch.device) -> None:
        self.buffer = torch.full((self.window,), float("nan"), dtype=torch.float32, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.n_finite = torch.zeros((), dtype=torch.long, device=device)
        self.n_seen = torch.zeros((), dtype=torch.long, device=device)
        self.n_spikes = torch.zeros((), dtype=torch.long, device=device)
        self.n_nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self.median = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self.mad = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self._calls = 0  # update() calls so far, counted on the host: the refresh schedule

    def _state_tensors(self) -> dict[str, Tensor]:
        return {
            "buffer": self.buffer,
            "pos": self.pos,
            "n_finite": self.n_finite,
            "n_seen": self.n_seen,
            "n_spikes": self.n_spikes,
            "n_nonfinite": self.n_nonfinite,
            "median": self.median,
            "mad": self.mad,
        }

    def to(self, device: torch.device | str) -> SpikeDetector:
        """Move the state to ``device`` (done automatically on the first :meth:`update` with a new device)."""
        for name, t in self._state_tensors().items():
            setattr(self, name, t.to(device))
        return self

    @property
    def device(self) -> torch.device:
        """Device of the state tensors."""
        return self.buffer.device

    def reset(self) -> None:
        """Clear the history and the counters (keeps the device)."""
        self._init_state(self.device)

    def baseline(self) -> tuple[Tensor, Tensor]:
        """``(median, MAD)`` of the buffer now (NaN while empty); :meth:`update` uses a cached copy."""
        med = torch.nanmedian(self.buffer)
        return med, torch.nanmedian((self.buffer - med).abs())

    def _refresh_due(self) -> bool:
        return self._calls < self.min_history or self._calls % self.refresh_every == 0

    def update(self, value: Tensor | float) -> Tensor:
        """Decide whether ``value`` is a spike against the history, then add it to the history if finite.

        Args:
            value: a scalar (0-dim or one-element tensor, any float dtype, or a Python number).

        Returns:
            0-dim bool tensor on the state's device (the value's device once it has been seen).
        """
        if isinstance(value, Tensor):
            if value.device != self.device:
                self.to(value.device)
            v = value.detach().reshape(()).to(torch.float32)
        else:
            v = torch.tensor(float(value), dtype=torch.float32, device=self.device)
        finite = torch.isfinite(v)
        if self._refresh_due():
            self.median, self.mad = self.baseline()
        self._calls += 1
        med, mad = self.median, self.mad
        scale = torch.maximum(mad, 1e-6 * med.abs())
        ready = self.n_finite >= self.min_history
        # comparisons with NaN (empty buffer) are False, so nothing finite is flagged before `ready` anyway
        spike = (~finite) | (ready & (v - med > self.threshold * MAD_TO_STD * scale))
        slot = self.pos.reshape(1)
        old = self.buffer.index_select(0, slot)
        self.buffer.index_copy_(0, slot, torch.where(finite, v, old.squeeze(0)).reshape(1))
        step = finite.long()
        self.pos = (self.pos + step) % self.window
        self.n_finite = self.n_finite + step
        self.n_seen = self.n_seen + 1
        self.n_spikes = self.n_spikes + spike.long()
        self.n_nonfinite = self.n_nonfinite + (1 - step)
        return spike

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: the buffer as a CPU tensor, counters as ints, and the settings.

        Reads the device state (a sync; call it only when checkpointing).
        """
        return {
            "window": self.window,
            "threshold": self.threshold,
            "min_history": self.min_history,
            "refresh_every": self.refresh_every,
            "calls": self._calls,
            "median": float(self.median),
            "mad": float(self.mad),
            "buffer": self.buffer.detach().cpu().clone(),
            "pos": int(self.pos),
            "n_finite": int(self.n_finite),
            "n_seen": int(self.n_seen),
            "n_spikes": int(self.n_spikes),
            "n_nonfinite": int(self.n_nonfinite),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (settings included), keeping the current device.

        A state saved before the baseline was cached (no ``"calls"``) resumes with the baseline recomputed on
        the next call.

        Raises:
            ValueError: if keys are missing or the stored buffer does not match the stored window.
        """
        required = (
            "window",
            "threshold",
            "min_history",
            "buffer",
            "pos",
            "n_finite",
            "n_seen",
            "n_spikes",
            "n_nonfinite",
        )
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"SpikeDetector.load_state_dict: missing keys {missing}")
        buffer = torch.as_tensor(state["buffer"], dtype=torch.float32)
        window = int(state["window"])
        if buffer.shape != (window,):
            raise ValueError(
                f"SpikeDetector.load_state_dict: buffer shape {tuple(buffer.shape)} does not match "
                f"window={window}"
            )
        # validate the settings through the constructor's checks
        refresh = state.get("refresh_every", self.refresh_every)
        checked = SpikeDetector(
            window, float(state["threshold"]), int(state["min_history"]), refresh_every=int(refresh)
        )
        self.window, self.threshold, self.min_history = checked.window, checked.threshold, checked.min_history
        self.refresh_every = checked.refresh_every
        device = self.device
        self.buffer = buffer.clone().to(device)
        for name in ("pos", "n_finite", "n_seen", "n_spikes", "n_nonfinite"):
            setattr(self, name, torch.tensor(int(state[name]), dtype=torch.long, device=device))
        if "calls" in state:
            self._calls = int(state["calls"])
            self.median = torch.tensor(float(state["median"]), dtype=torch.float32, device=device)
            self.mad = torch.tensor(float(state["mad"]), dtype=torch.float32, device=device)
        else:  # an older state: refresh on the next call
            self._calls = 0
            self.median, self.mad = self.baseline()
