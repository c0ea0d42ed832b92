"""A training run's scalars as JSON lines beside its TensorBoard logs: written by a CLU writer, read back without
TensorBoard (notebooks, tests, the evaluator)."""

import json

from clu import metric_writers
from etils import epath

METRICS_FILE = "metrics.jsonl"


class ScalarWriter(metric_writers.MetricWriter):
    """A CLU writer that takes only scalars and ignores everything else; subclasses define `write_scalars` (left
    abstract by MetricWriter)."""

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


class JsonlWriter(ScalarWriter):
    """Scalars as JSON lines {"step": s, name: value, ...} appended to a file (local or gs://): readable without
    TensorBoard (a notebook, a test). A resumed run appends again from its checkpoint, so the last line of a step
    wins. Cloud objects cannot be appended to, so the writer keeps the file's text and writes it whole each time."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.text = self.path.read_text() if self.path.exists() else ""

    def write_scalars(self, step, scalars):
        self.text += json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n"
        self.path.write_text(self.text)


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
    """{step: scalars} from WORKDIR/metrics.jsonl (the lines of one step merged: training and evaluation scalars);
    for a scalar logged twice at a step (before a crash and after the resume) the later line wins."""
    rows = {}
    path = epath.Path(workdir) / METRICS_FILE
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row.pop("step"), {}).update(row)
    return rows
