"""Per-epoch metrics are written in batches, and every epoch's value arrives exactly."""

from __future__ import annotations

import math

import mlflow

from melvae import track


def test_epoch_metrics_wait_for_flush_and_then_hold_every_step(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    epochs = 130  # 130 epochs x 8 metrics: more than one log_batch call may take
    with mlflow.start_run() as run:
        curves = track.EpochMetrics(flush_seconds=math.inf)
        for epoch in range(epochs):
            curves.log({f"m{i}": epoch + i / 10 for i in range(8)}, step=epoch)
        assert client.get_run(run.info.run_id).data.metrics == {}, "nothing written yet"
        curves.flush()
        history = client.get_metric_history(run.info.run_id, "m3")
        assert [(m.step, m.value) for m in history] == [(e, e + 0.3) for e in range(epochs)]
        every_epoch = track.EpochMetrics(flush_seconds=0)
        every_epoch.log({"n": 1.0}, step=0)
        assert client.get_run(run.info.run_id).data.metrics["n"] == 1.0, "written at once"
