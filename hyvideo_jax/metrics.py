"""A training run's scalars as JSON lines beside its TensorBoard logs: written by a CLU writer, read back without
TensorBoard (notebooks, tests, the evaluator)."""

import json
import os

from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines {"step": s, name: value, ...} appended to a file: readable without TensorBoard (a
    notebook, a test). A resumed run appends again from its checkpoint, so the last line of a step wins."""

    def __init__(self, path: str):
        self.path = path

    def write_scalars(self, step, scalars):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
    """{step: scalars} from WORKDIR/metrics.jsonl (the lines of one step merged: training and evaluation scalars);
    for a scalar logged twice at a step (before a crash and after the resume) the later line wins."""
    rows = {}
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                rows.setdefault(row.pop("step"), {}).update(row)
    return rows
