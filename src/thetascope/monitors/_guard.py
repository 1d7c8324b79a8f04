"""Never break training: failed measurements are reported once and disabled on every rank alike."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

__all__ = ["FailureGuard"]


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
