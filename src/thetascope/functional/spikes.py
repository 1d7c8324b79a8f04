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


def _settled(name: str, doc: str) -> property:
    """A read-only view of the state tensor ``name`` as of the last value pushed (settles pending values)."""

    def get(self: SpikeDetector) -> Tensor:
        self._settle()
        value: Tensor = getattr(self, name)
        return value

    return property(get, doc=doc)


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

    :meth:`update` returns the decision on its value at once. :meth:`push` defers it: the values of a block
    (the calls between two refreshes) are all judged against the same baseline, so they are stored with one
    device copy each and judged together, in order, when the block ends or the state is read (the counters
    and the buffer below are properties that do so). The decisions and the state are those of :meth:`update`
    value by value, for about 4 device operations per call instead of about 20. Neither synchronises with the
    host (no ``.item()``, no branching on values). The state
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
        # ring buffer plus one trash slot at index ``window``: values that must not enter the buffer (the
        # non-finite ones) are written there, so a whole block is stored by one index_copy_
        self._ring = torch.full((self.window + 1,), float("nan"), dtype=torch.float32, device=device)
        self._pos = torch.zeros((), dtype=torch.long, device=device)
        self._n_finite = torch.zeros((), dtype=torch.long, device=device)
        self._n_seen = torch.zeros((), dtype=torch.long, device=device)
        self._n_spikes = torch.zeros((), dtype=torch.long, device=device)
        self._n_nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self.median = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self.mad = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self._limit = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self._last_spike = torch.zeros((), dtype=torch.bool, device=device)
        # values pushed since the last settlement; they are all judged against the same baseline (see push)
        self._pending = torch.empty(min(self.refresh_every, self.window), dtype=torch.float32, device=device)
        self._n_pending = 0
        self._calls = 0  # push() calls so far, counted on the host: the refresh schedule

    def _state_tensors(self) -> dict[str, Tensor]:
        return {
            "_ring": self._ring,
            "_pos": self._pos,
            "_n_finite": self._n_finite,
            "_n_seen": self._n_seen,
            "_n_spikes": self._n_spikes,
            "_n_nonfinite": self._n_nonfinite,
            "median": self.median,
            "mad": self.mad,
            "_limit": self._limit,
            "_last_spike": self._last_spike,
            "_pending": self._pending,
        }

    # The state as of the last value pushed (reading it settles the pending values first).
    @property
    def buffer(self) -> Tensor:
        """The ring buffer ``[window]`` of the last finite values (NaN where not yet filled)."""
        self._settle()
        return self._ring[: self.window]

    pos = _settled("_pos", "0-dim long: the ring index the next finite value goes to.")
    n_finite = _settled("_n_finite", "0-dim long: finite values seen.")
    n_seen = _settled("_n_seen", "0-dim long: values seen.")
    n_spikes = _settled("_n_spikes", "0-dim long: values flagged (non-finite ones included).")
    n_nonfinite = _settled("_n_nonfinite", "0-dim long: non-finite values seen.")

    def to(self, device: torch.device | str) -> SpikeDetector:
        """Move the state to ``device`` (done automatically on the first :meth:`update` with a new device)."""
        self._settle()
        for name, t in self._state_tensors().items():
            setattr(self, name, t.to(device))
        return self

    @property
    def device(self) -> torch.device:
        """Device of the state tensors."""
        return self._ring.device

    def reset(self) -> None:
        """Clear the history and the counters (keeps the device)."""
        self._init_state(self.device)

    def baseline(self) -> tuple[Tensor, Tensor]:
        """``(median, MAD)`` of the buffer now (NaN while empty); :meth:`update` uses a cached copy."""
        buf = self.buffer
        med = torch.nanmedian(buf)
        return med, torch.nanmedian((buf - med).abs())

    def _refresh_due(self) -> bool:
        return self._calls < self.min_history or self._calls % self.refresh_every == 0

    def update(self, value: Tensor | float) -> Tensor:
        """Decide whether ``value`` is a spike against the history, then add it to the history if finite.

        :meth:`push` followed by settling the pending values (about 22 small device operations per call);
        use :meth:`push` on a per-step path and read the counters when needed.

        Args:
            value: a scalar (0-dim or one-element tensor, any float dtype, or a Python number).

        Returns:
            0-dim bool tensor on the state's device (the value's device once it has been seen).
        """
        self.push(value)
        self._settle()
        return self._last_spike

    def push(self, value: Tensor | float) -> None:
        """Add ``value`` to the series; it is judged (and counted) on the next read of the state.

        The same decisions as :meth:`update` for the same values, at one device copy per call and one
        settlement (about 25 small operations) per baseline refresh, instead of about 20 operations per call.

        Args:
            value: a scalar (0-dim or one-element tensor, any float dtype, or a Python number).
        """
        if isinstance(value, Tensor):
            if value.device != self.device:
                self.to(value.device)
            v = value.detach().reshape(())
        else:
            v = torch.tensor(float(value), dtype=torch.float32, device=self.device)
        if self._refresh_due():
            # the values of the previous block are judged against its own baseline, then the buffer, which
            # now holds them, gives the baseline of the block that starts with this value
            self._settle()
            self.median, self.mad = self.baseline()
            self._limit = self._limit_of(self.median, self.mad)
        elif self._n_pending == self._pending.numel():
            self._settle()  # within a block the baseline is fixed: settling early changes nothing
        self._pending[self._n_pending].copy_(v)  # converts to float32
        self._n_pending += 1
        self._calls += 1

    def _settle(self) -> None:
        """Judge the pending values (all against ``_limit``), add the finite ones to the buffer in order."""
        k = self._n_pending
        if k == 0:
            return
        self._n_pending = 0
        v = self._pending[:k]
        finite = torch.isfinite(v)
        count = finite.long()
        if k == 1:  # update(): no earlier value of the block to count (three operations less)
            ready, slots = self._n_finite >= self.min_history, self._pos
        else:
            before = torch.cumsum(count, 0) - count  # finite values of this block before each value
            ready, slots = (self._n_finite + before) >= self.min_history, (self._pos + before) % self.window
        # comparisons with NaN (empty buffer, NaN value) are False
        spike = (ready & (v > self._limit)) | ~finite
        # k <= window, so the finite values get distinct ring slots; the others go to the trash slot
        slots = torch.where(finite, slots, self.window)
        self._ring.index_copy_(0, slots, v)
        added = count.sum() if k > 1 else count[0]
        self._pos = (self._pos + added) % self.window
        self._n_finite = self._n_finite + added
        self._n_seen = self._n_seen + k
        self._n_spikes = self._n_spikes + (spike.sum() if k > 1 else spike[0])
        self._n_nonfinite = self._n_nonfinite + (k - added)
        self._last_spike = spike[-1]

    def _limit_of(self, med: Tensor, mad: Tensor) -> Tensor:
        # the spike threshold of a baseline: median + threshold * 1.4826 * max(MAD, 1e-6 |median|)
        return med + self.threshold * MAD_TO_STD * torch.maximum(mad, 1e-6 * med.abs())

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: the buffer as a CPU tensor, counters as ints, and the settings.

        Reads the device state (a sync; call it only when checkpointing).
        """
        self._settle()
        return {
            "window": self.window,
            "threshold": self.threshold,
            "min_history": self.min_history,
            "refresh_every": self.refresh_every,
            "calls": self._calls,
            "median": float(self.median),
            "mad": float(self.mad),
            "buffer": self._ring[: self.window].detach().cpu().clone(),
            "pos": int(self._pos),
            "n_finite": int(self._n_finite),
            "n_seen": int(self._n_seen),
            "n_spikes": int(self._n_spikes),
            "n_nonfinite": int(self._n_nonfinite),
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
        self._init_state(device)  # fresh pending buffer and trash slot for the restored window
        self._ring[:window].copy_(buffer)
        for name in ("pos", "n_finite", "n_seen", "n_spikes", "n_nonfinite"):
            setattr(self, f"_{name}", torch.tensor(int(state[name]), dtype=torch.long, device=device))
        if "calls" in state:
            self._calls = int(state["calls"])
            self.median = torch.tensor(float(state["median"]), dtype=torch.float32, device=device)
            self.mad = torch.tensor(float(state["mad"]), dtype=torch.float32, device=device)
        else:  # an older state: refresh on the next call
            self._calls = 0
            self.median, self.mad = self.baseline()
        self._limit = self._limit_of(self.median, self.mad)
