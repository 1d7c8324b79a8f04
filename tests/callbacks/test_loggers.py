"""Scalars and heatmap images through real W&B (offline), MLflow (file store), TensorBoard and CSV loggers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.callbacks._models import LM, read_csv_metrics, read_tb_scalars, token_data, trainer
from thetascope.callbacks import GradientFlowMonitor
from thetascope.callbacks._loggers import logger_kind, write_images

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

HEAT = "stability/grad_norm/heatmap"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    # MLflow 3 keeps the file store only on request (it is what a test without a server can use)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _fit(tmp_path: Path, loggers: list[Any], steps: int, log_every: int) -> tuple[GradientFlowMonitor, list]:
    mon = GradientFlowMonitor(every_n_steps=2, strict=True)
    t = trainer(tmp_path, [mon], steps=steps, logger=loggers, log_every_n_steps=log_every)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(LM("demo-pre", n_layer=3), token_data())
    return mon, caught


def test_wandb_mlflow_csv_read_back_scalars_and_images(tmp_path: Path, offline: None) -> None:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
    from mlflow.tracking import MlflowClient

    from tests.helpers.wandb_offline import read_history

    uri = f"file:{tmp_path / 'mlruns'}"
    wb = WandbLogger(save_dir=str(tmp_path / "wb"), offline=True, project="ts")
    ml = MLFlowLogger(experiment_name="ts", tracking_uri=uri)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    mon, caught = _fit(tmp_path, [csv_logger, wb, ml], steps=5, log_every=1)
    wb.experiment.finish()
    measured = [0, 2, 4]

    # the CSV logger is the reference for the scalars; it takes no images and is warned about exactly once
    csv = read_csv_metrics(tmp_path / "csv/version_0/metrics.csv")
    keys = [k for k in csv if k.startswith("stability/")]
    assert "stability/grad_norm_global" in keys
    assert "stability/grad_norm/layer_02" in keys
    no_image = [w for w in caught if "CSVLogger takes no images" in str(w.message)]
    assert len(no_image) == 1, [str(w.message) for w in caught]

    # W&B: scalar rows and image rows at the measured trainer steps, read from the offline run file
    (run_dir,) = (tmp_path / "wb/wandb").glob("offline-run-*")
    rows = read_history(run_dir)
    for key in keys:
        got = {r["trainer/global_step"]: r[key] for r in rows if key in r}
        assert got == pytest.approx(csv[key]), key
    image_rows = [r for r in rows if f"{HEAT}/filenames" in r]
    assert [r["trainer/global_step"] for r in image_rows] == measured
    last = run_dir / "files" / image_rows[-1][f"{HEAT}/filenames"][0]
    np.testing.assert_array_equal(_png(last), mon._heat.image())

    # MLflow: metric history per key and one stepped image per measurement, over the client
    client = MlflowClient(uri)
    for key in keys:
        got = {m.step: m.value for m in client.get_metric_history(ml.run_id, key)}
        assert got == pytest.approx(csv[key]), key
    pngs = sorted(
        (a.path for a in client.list_artifacts(ml.run_id, "images") if a.path.endswith(".png")),
        key=lambda p: int(p.split("+step+")[1].split("+")[0]),
    )
    assert [int(p.split("+step+")[1].split("+")[0]) for p in pngs] == measured
    assert all(Path(p).name.startswith("stability~grad_norm~heatmap") for p in pngs)
    local = client.download_artifacts(ml.run_id, pngs[-1], str(tmp_path / "dl"))
    np.testing.assert_array_equal(_png(Path(local)), mon._heat.image())


def test_images_follow_log_every_n_steps_tensorboard(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    _, caught = _fit(tmp_path, [tb], steps=7, log_every=4)
    scalars, image_tags = read_tb_scalars(tmp_path / "tb/version_0")
    assert sorted(scalars["stability/grad_norm_global"]) == [0, 2, 4, 6]  # scalars: every measurement
    assert image_tags == [HEAT]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb/version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images(HEAT)] == [0, 4]  # images: at most once per 4 steps
    assert not [w for w in caught if "takes no images" in str(w.message)]


def test_unknown_logger_warned_once_and_kinds() -> None:
    class Custom:
        pass

    seen: list[str] = []
    img = np.zeros((2, 2, 3), np.uint8)
    logger = Custom()
    for step in range(3):
        assert write_images([logger], {"a": img, "b": img}, step, warn=seen.append) == 0
    assert len(seen) == 1
    assert "Custom takes no images" in seen[0]
    assert logger_kind(logger) == "unknown"

    class Broken:  # an image-taking kind whose write fails: warned once, never raised
        class experiment:
            @staticmethod
            def add_image(*args: Any, **kwargs: Any) -> None:
                raise OSError("disk full")

    Broken.__name__ = "TensorBoardLogger"
    broken = Broken()
    seen.clear()
    assert write_images([broken], {"a": img}, 0, warn=seen.append) == 0
    assert write_images([broken], {"a": img}, 1, warn=seen.append) == 0
    assert len(seen) == 1
    assert "disk full" in seen[0]
