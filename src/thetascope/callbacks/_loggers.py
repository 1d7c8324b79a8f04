"""Scalars and images to each kind of Lightning logger through that logger's own API.

Lightning has a common scalar API (``Logger.log_metrics``) but no common image API, so every logger kind gets
an adapter: TensorBoard (``SummaryWriter.add_image``), Weights & Biases (``WandbLogger.log_image``), MLflow
(``MlflowClient.log_image`` with a key and a step, else a PNG through ``log_artifact``) and CSV (scalars
only). A logger that takes no images (CSV, or a kind we do not know) gets ONE rank-zero warning the first time
an image is offered to it, then is skipped silently.

Images are throttled to the trainer's ``log_every_n_steps``: an image tag is written again only when at least
that many optimizer steps passed since it was last written to that logger (PNG encoding and upload are the
costly part of logging; scalars are always written at every measurement).
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_KINDS",
    "images_due",
    "logger_kind",
    "write_images",
    "write_scalars",
]

#: Logger kinds that take images.
IMAGE_KINDS: frozenset[str] = frozenset({"tensorboard", "wandb", "mlflow"})

_KIND_BY_CLASS = {
    "TensorBoardLogger": "tensorboard",
    "WandbLogger": "wandb",
    "MLFlowLogger": "mlflow",
    "CSVLogger": "csv",
}

# Loggers already warned about (weak: a logger that goes away takes its entry with it), and per logger the
# step each image tag was last written at (for the log_every_n_steps throttle).
_warned: weakref.WeakSet[Any] = weakref.WeakSet()
_last_image_step: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def logger_kind(logger: Any) -> str:
    """``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"csv"`` or ``"unknown"``, by class (subclasses count).

    Classes are matched by name along the MRO, so ``lightning.pytorch`` and ``pytorch_lightning`` loggers
    (and user subclasses) are recognised without importing either package here.

    Example:
        >>> class CSVLogger: ...
        >>> class MyCSV(CSVLogger): ...
        >>> logger_kind(MyCSV()), logger_kind(object())
        ('csv', 'unknown')
    """
    for cls in type(logger).__mro__:
        kind = _KIND_BY_CLASS.get(cls.__name__)
        if kind is not None:
            return kind
    return "unknown"


def write_scalars(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """``log_metrics`` on every logger (the call every Lightning logger implements), values as floats."""
    if not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in loggers:
        logger.log_metrics(clean, step=step)


def images_due(logger: Any, tag: str, step: int, every: int) -> bool:
    """True when ``tag`` was never written to ``logger`` or was last written ``every`` or more steps ago.

    Example:
        >>> class L: ...
        >>> lg = L()
        >>> images_due(lg, "t", 0, 10)
        True
        >>> _mark(lg, "t", 0); images_due(lg, "t", 5, 10), images_due(lg, "t", 10, 10)
        (False, True)
    """
    last = _last_image_step.get(logger, {}).get(tag)
    return last is None or step < last or step - last >= max(int(every), 1)


def _mark(logger: Any, tag: str, step: int) -> None:
    _last_image_step.setdefault(logger, {})[tag] = int(step)


def _tensorboard(logger: Any, tag: str, img: Any, step: int) -> None:
    logger.experiment.add_image(tag, img, global_step=step, dataformats="HWC")


def _wandb(logger: Any, tag: str, img: Any, step: int) -> None:
    logger.log_image(key=tag, images=[img], step=step)


def _mlflow(logger: Any, tag: str, img: Any, step: int) -> None:
    client, run_id = logger.experiment, logger.run_id
    try:
        # MLflow >= 2.12: a keyed, stepped image series (the UI's image slider)
        client.log_image(run_id, img, key=tag, step=step)
    except TypeError:
        # older MLflow: one PNG artifact per (tag, step) under thetascope/
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{tag.replace('/', '__')}_step{step:08d}.png"
            Image.fromarray(img).save(path)
            client.log_artifact(run_id, str(path), artifact_path="thetascope")


_WRITERS: dict[str, Callable[[Any, str, Any, int], None]] = {
    "tensorboard": _tensorboard,
    "wandb": _wandb,
    "mlflow": _mlflow,
}


def write_images(
    loggers: Iterable[Any],
    images: Mapping[str, Any],
    step: int,
    every: int = 1,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Write HWC ``uint8`` images to every logger that takes images; returns how many were written.

    Args:
        loggers: the loggers (call from global rank zero only).
        images: tag -> ``[H, W, 3]`` ``uint8`` array.
        step: the optimizer step.
        every: write a tag to a logger again only after this many steps (the trainer's
            ``log_every_n_steps``).
        warn: how to warn (default :func:`warnings.warn`); called once per logger that takes no images and
            once per failed write, which never propagates (an image is not worth breaking training for).
    """
    if warn is None:
        import warnings

        def warn(msg: str) -> None:
            warnings.warn(msg, UserWarning, stacklevel=3)

    written = 0
    if not images:
        return 0
    for logger in loggers:
        kind = logger_kind(logger)
        writer = _WRITERS.get(kind)
        if writer is None:
            if logger not in _warned:
                _warned.add(logger)
                warn(
                    f"thetascope: {type(logger).__name__} takes no images; the layer x step heatmaps are "
                    "not logged to it (scalars are). TensorBoard, W&B and MLflow loggers receive them."
                )
            continue
        for tag, img in images.items():
            if not images_due(logger, tag, step, every):
                continue
            try:
                writer(logger, tag, img, step)
            except Exception as err:
                if logger not in _warned:
                    _warned.add(logger)
                    warn(f"thetascope: could not log heatmap images to {type(logger).__name__}: {err}")
                continue
            _mark(logger, tag, step)
            written += 1
    return written
