"""Non-finite steps: a few are skipped (the state unchanged, counted), `train.max_consecutive_skips` in a row stop the
run with a sentence and nothing after them is saved."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

from hyvideo_jax import train
from hyvideo_jax.data import pipeline
from tests.test_train import small_config


class PoisonedSteps:
    """The training iterator with NaN latents in the batches of `steps` (1-based), its state passed through."""

    def __init__(self, iterator, steps):
        self.iterator, self.steps, self.step = iterator, set(steps), 0

    def __next__(self):
        batch = next(self.iterator)
        self.step += 1
        if self.step in self.steps:
            batch = dict(batch, latents=np.full_like(batch["latents"], np.nan))
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


@pytest.fixture
def poisoned(monkeypatch):
    def poison(steps):
        make = pipeline.make_train_pipeline
        monkeypatch.setattr(pipeline, "make_train_pipeline", lambda *a, **k: PoisonedSteps(make(*a, **k), steps))
    return poison


def steps_saved(workdir):
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def test_a_few_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path, poisoned):
    poisoned({3, 4, 5})
    config = small_config(num_steps=7, checkpoint_every_steps=2, max_consecutive_skips=4)
    state = train.train_and_evaluate(config, str(tmp_path / "three"))
    rows = train.read_metrics(str(tmp_path / "three"))
    assert int(state.step) == 7 and int(state.skipped) == 3
    assert [rows[s]["skipped_steps"] for s in range(1, 8)] == [0, 0, 1, 2, 3, 3, 3]
    assert np.isfinite(rows[7]["loss"])

    config = small_config(num_steps=7, checkpoint_every_steps=2, max_consecutive_skips=3)
    with pytest.raises(train.NonFiniteSteps, match=r"^3 consecutive steps \(3 to 5\) had a non-finite loss or "
                       r"gradient norm \(train.max_consecutive_skips=3\); stopping without saving them"):
        train.train_and_evaluate(config, str(tmp_path / "stopped"))
    assert steps_saved(tmp_path / "stopped") == [2, 4]   # step 4 (two skipped so far) is saved, nothing after
