"""The Colab notebook runs top to bottom on a tiny checkpoint: it writes the video and the plot, and the validation
loss it prints is the evaluate command's."""

import json
import os
import re

import av
import nbformat
import numpy as np
from nbclient import NotebookClient

from configs import tiny
from hyvideo_jax import evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "evaluate_checkpoint.ipynb")


def set_parameters(notebook, **values):
    """The form cell with `values` in place of its defaults (each must be a parameter of the form)."""
    cell = next(c for c in notebook.cells if c.cell_type == "code" and "# @title Parameters" in c.source)
    for name, value in values.items():
        pattern = rf"^{name} = .*?(  # @param.*)$"
        assert re.search(pattern, cell.source, re.M), name
        cell.source = re.sub(pattern, lambda m: f"{name} = {value!r}{m.group(1)}", cell.source, flags=re.M)


def test_notebook_evaluates_a_checkpoint(tmp_path):
    config = tiny.get_config()
    config.data.random_latent_shapes = ((3, 4, 4),)   # 9 frames at 32x32, as the sampler makes them
    config.data.random_records = 16
    config.data.eval_fraction = 0.25
    config.train.update(num_steps=2, checkpoint_every_steps=2, eval_every_steps=1)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    want = evaluate.evaluate_workdir(config, workdir, samples=False, progress=False)[2]["eval/loss"]

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    out = str(tmp_path / "outputs")
    set_parameters(notebook, WORKDIR=workdir, OUTPUT_DIR=out, HEIGHT=32, WIDTH=32, FRAMES=9, SAMPLING_STEPS=3)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    text = "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    printed = float(re.search(r"validation loss: ([0-9.e+-]+) over 4 clips", text).group(1))
    print(f"notebook validation loss {printed!r}, evaluate command {want!r}")
    assert printed == want
    with av.open(os.path.join(out, "sample.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) == 9
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The plot shows the training curve and the in-loop evaluations (steps 1 and 2).
    rows = train.read_metrics(workdir)
    assert sorted(s for s, r in rows.items() if "eval/loss" in r) == [1, 2] and np.isfinite(rows[2]["loss"])
    assert json.loads(open(os.path.join(workdir, "config.json")).read())["data"]["eval_fraction"] == 0.25
