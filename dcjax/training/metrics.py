"""Metric writers: clu's console logger, TensorBoard event files and a metrics.jsonl a script can
read, all behind clu's MetricWriter interface.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers
from clu.metric_writers import interface

from dcjax.core.distributed import is_main

__all__ = ["JsonlWriter", "TensorboardXWriter", "create_writer", "read_jsonl"]


def _to_python(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.size == 1 else array.tolist()


class JsonlWriter(interface.MetricWriter):
    """Appends one JSON object per ``write_scalars`` call: ``{"step": s, name: value, ...}``."""

    def __init__(self, path: str):
        self._path = path

    def write_scalars(self, step: int, scalars: Mapping[str, interface.Scalar]):
        record = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_hparams(self, hparams: Mapping[str, Any]):
        with open(self._path, "a") as f:
            f.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        """One record ``{"step": s, name: text, ...}`` (the loop's warnings)."""
        record = {"step": int(step), **{k: str(v) for k, v in texts.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class TensorboardXWriter(interface.MetricWriter):
    """TensorBoard event files through tensorboardX (clu's own SummaryWriter needs TensorFlow)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, interface.Scalar]):
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(np.asarray(value)), global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._writer.add_text("hparams", json.dumps({k: str(v) for k, v in hparams.items()}))

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        for name, image in images.items():
            self._writer.add_images(
                name, np.asarray(image), global_step=int(step), dataformats="NHWC"
            )

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        for name, text in texts.items():
            self._writer.add_text(name, text, global_step=int(step))

    def write_histograms(self, step, arrays, num_buckets=None):
        for name, values in arrays.items():
            self._writer.add_histogram(name, np.asarray(values), global_step=int(step))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """Console + TensorBoard (``workdir/tensorboard``) + ``workdir/metrics.jsonl``.

    Processes other than 0 of a multi-process run only log to the console.
    """
    if not is_main():
        return metric_writers.MultiWriter([metric_writers.LoggingWriter()])
    os.makedirs(workdir, exist_ok=True)
    return metric_writers.MultiWriter(
        [
            metric_writers.LoggingWriter(),
            TensorboardXWriter(os.path.join(workdir, "tensorboard")),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ]
    )


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
