"""Our flow-matching train step (forward + backward + clipping + AdamW, jitted, state donated) against the same step
in PyTorch (diffusers' HunyuanVideoTransformer3DModel, eager, torch.optim.AdamW) on the same CPU, weights and shapes.

Prints, for the tiny test config and a small 10.4M-parameter config: compile time, step time (best of --repeats),
image tokens per second, and the ratio ours / PyTorch (lower is better).

    python -m benchmarks.train_step [--repeats=5] [--threads=2]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402

from benchmarks import dit_vs_diffusers  # noqa: E402
from benchmarks.dit_vs_diffusers import best_of  # noqa: E402
from hyvideo_jax import flow, objectives, train  # noqa: E402
from hyvideo_jax.convert import load_torch_dit  # noqa: E402
from hyvideo_jax.models.dit import HunyuanVideoDiT  # noqa: E402

# diffusers configs; (frames, height, width) of the latents, text tokens, batch.
CONFIGS = {
    "tiny": (dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
                  num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                  guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24, rope_axes_dim=(4, 6, 6)),
             (2, 4, 8), 32, 8),
    "small": (dit_vs_diffusers.CONFIG, (5, 32, 32), 64, 2),   # the DiT benchmark's config
}
LR, CLIP = 1e-4, 1.0



def bench(name, repeats):
    diffusers_config, (t, h, w), text_len, batch = CONFIGS[name]
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**diffusers_config)
    n_params = sum(p.numel() for p in model.parameters())
    c = diffusers_config["in_channels"]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, t, h, w, c)).astype(np.float32)
    text = rng.standard_normal((batch, text_len, diffusers_config["text_embed_dim"])).astype(np.float32)
    mask = np.ones((batch, text_len), np.int32)
    mask[-1, text_len // 3:] = 0
    pooled = rng.standard_normal((batch, diffusers_config["pooled_projection_dim"])).astype(np.float32)
    tokens = batch * t * (h // 2) * (w // 2)

    # Ours: the trainer's step on one device.
    cfg, params = load_torch_dit(model.state_dict(), config=dict(rope_axes_dim=diffusers_config["rope_axes_dim"]),
                                 progress=False)
    train_config = train.TrainConfig(learning_rate=LR, grad_clip_norm=CLIP)
    dit = HunyuanVideoDiT(cfg)
    task = objectives.Task(dit, flow.flow_matching_objective(dit, flow.FlowConfig()), None,
                      ("latents", "text_states", "text_mask", "pooled_text"), None)
    tx = train.make_optimizer(train_config)
    params = jax.device_put(params)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             ema_params=None, skipped=jnp.zeros((), jnp.int32))
    step = jax.jit(train.make_train_step(task, tx, train_config), donate_argnums=0)
    batch_arrays = {k: jnp.asarray(v) for k, v in
                    dict(latents=latents, text_states=text, text_mask=mask, pooled_text=pooled).items()}
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays, key).compile()
    compile_seconds = time.perf_counter() - t0
    holder = [state]

    def ours():
        holder[0], metrics = compiled(holder[0], batch_arrays, key)
        jax.block_until_ready(metrics)
    ours()

    # PyTorch: the same objective (logit-normal σ, x_σ = (1-σ)x + σε, target ε - x), clipping and AdamW.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, eps=1e-8)
    x = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).contiguous()
    text_t, mask_t, pooled_t = torch.from_numpy(text), torch.from_numpy(mask).long(), torch.from_numpy(pooled)
    guidance = torch.full((batch,), 1000.0)

    def pytorch():
        sigma = torch.sigmoid(torch.randn(batch))
        noise = torch.randn_like(x)
        s = sigma.view(-1, 1, 1, 1, 1)
        optimizer.zero_grad(set_to_none=True)
        v = model((1 - s) * x + s * noise, 1000 * sigma, text_t, mask_t, pooled_t, guidance, return_dict=False)[0]
        loss = (v - (noise - x)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
    pytorch()

    ours_s, torch_s = best_of([ours, pytorch], repeats)   # in turn: both see the same load
    print(f"{name:6s} {n_params / 1e6:6.2f}M params, batch {batch}, {tokens:5d} image tokens | compile "
          f"{compile_seconds:6.2f} s | ours {ours_s:7.4f} s/step, {tokens / ours_s:9.0f} tokens/s | PyTorch "
          f"{torch_s:7.4f} s/step, {tokens / torch_s:9.0f} tokens/s | ours/PyTorch {ours_s / torch_s:5.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__}, "
          f"{args.threads} threads; step = forward + backward + global-norm clip + AdamW")
    for name in CONFIGS:
        bench(name, args.repeats)


if __name__ == "__main__":
    main()
