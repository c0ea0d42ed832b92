"""Caption dropout: a sample trains on the empty prompt's encoding with the configured chance, decided per sample
and step from its key; the trainer finds the encoding beside the clips or encodes it."""

import jax
import numpy as np
import pytest

from hyvideo_jax import flow, objectives
from hyvideo_jax.data import pipeline
from hyvideo_jax.models.dit import HunyuanVideoDiT
from tests.test_dit_model import example_inputs, random_init, tiny_config
from tests.test_train import small_config


def test_dropped_samples_train_on_the_empty_prompt():
    cfg = tiny_config(depth_double=1, depth_single=1, depth_refiner=1)
    model = HunyuanVideoDiT(cfg)
    params = random_init(cfg, example_inputs(cfg))
    rng = np.random.default_rng(0)
    b, length = 8, 5
    batch = {"latents": rng.standard_normal((b, 2, 4, 4, cfg.in_channels)).astype(np.float32),
             "text_states": rng.standard_normal((b, length, cfg.text_states_dim)).astype(np.float32),
             "text_mask": np.ones((b, length), np.int32),
             "pooled_text": rng.standard_normal((b, cfg.pooled_text_dim)).astype(np.float32)}
    null = {"text_states": rng.standard_normal((length, cfg.text_states_dim)).astype(np.float32),
            "text_mask": np.array([1, 0, 0, 0, 0], np.int32),
            "pooled_text": rng.standard_normal(cfg.pooled_text_dim).astype(np.float32)}
    rngs = jax.random.split(jax.random.PRNGKey(4), b)
    config = flow.FlowConfig()
    drop = np.asarray(flow.caption_dropped(rngs, 0.5))
    np.testing.assert_array_equal(drop, np.asarray(flow.caption_dropped(rngs, 0.5)))     # deterministic
    assert 0 < drop.sum() < b
    many = np.asarray(flow.caption_dropped(jax.random.split(jax.random.PRNGKey(0), 4000), 0.1))
    print(f"caption dropout 0.1: {many.mean():.3f} of 4,000 samples dropped; this batch drops {drop.tolist()}")
    assert abs(many.mean() - 0.1) < 0.02

    with_dropout = jax.jit(flow.flow_matching_objective(model, config, 0.5, null))(params, batch, rngs)[0]
    replaced = {k: np.where(drop.reshape((-1,) + (1,) * (v.ndim - 1)), null[k][None], v) if k in null else v
                for k, v in batch.items()}
    plain = jax.jit(flow.flow_matching_objective(model, config))
    np.testing.assert_allclose(float(with_dropout), float(plain(params, replaced, rngs)[0]), rtol=1e-6)
    assert abs(float(with_dropout) - float(plain(params, batch, rngs)[0])) > 1e-4 * float(with_dropout)
    with pytest.raises(ValueError, match="needs the empty prompt"):
        flow.flow_matching_objective(model, config, 0.5)


def test_trainer_encodes_the_empty_prompt_when_none_is_stored():
    config = small_config()
    config.data.caption_dropout = 0.2
    null = objectives.null_text(config, pipeline.DataConfig.from_config(config.data))
    assert null["text_states"].shape == (config.data.text_len, config.data.text_dim)
    assert null["text_mask"].sum() == 1
    objectives.flow_task(config)       # builds the objective with it
    config.data.text_len = 7
    with pytest.raises(ValueError, match=r"data.caption_dropout: the empty prompt's text_states has shape \(32, 32\), "
                                         r"the clips \(7, 32\)"):
        objectives.flow_task(config)
    config.data.caption_dropout = 1.0
    with pytest.raises(ValueError, match=r"data.caption_dropout: must be in \[0, 1\)"):
        pipeline.DataConfig.from_config(config.data)
