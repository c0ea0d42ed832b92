"""Records/s of the Grain pipeline (ArrayRecord shards → bucketed batches) against the tiny DiT train step's
consumption rate (batch / seconds of one jitted forward+backward), on this machine's CPU cores.

Prints both rates and their ratio pipeline / consumption (the pipeline is not the bottleneck when it is > 1).
The two are timed one after the other; in training they share the cores, so the ratio is an upper bound on the
pipeline's margin there.

    python -m benchmarks.pipeline [--records=512] [--batches=200] [--workers=0,2] [--latent=5,8,8]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402

from configs import tiny  # noqa: E402
from hyvideo_jax.data.pipeline import DataConfig, RandomClipSource, make_train_pipeline  # noqa: E402
from hyvideo_jax.data.schema import serialize  # noqa: E402
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT  # noqa: E402


def write_shards(folder, source, shards):
    """Source records into `shards` ArrayRecord files; their paths."""
    paths, per_shard = [], -(-len(source) // shards)
    for s in range(shards):
        path = os.path.join(folder, f"clips-{s:05d}.array_record")
        writer = ArrayRecordWriter(path, "group_size:1")
        for i in range(s * per_shard, min((s + 1) * per_shard, len(source))):
            writer.write(serialize(source[i]))
        writer.close()
        paths.append(path)
    return paths


def pipeline_rate(config: DataConfig, batches: int) -> float:
    """Records/s over `batches` batches after a warm-up of 5 (worker start-up excluded)."""
    it = make_train_pipeline(config, 0, 1, seed=0)
    try:
        for _ in range(5):
            next(it)
        t0 = time.perf_counter()
        records = sum(int(next(it)["valid"].sum()) for _ in range(batches))
        return records / (time.perf_counter() - t0)
    finally:
        if hasattr(it, "close"):
            it.close()


def train_step_rate(config, batch: dict, repeats: int) -> tuple[float, float]:
    """(records/s, seconds per step) of a jitted forward+backward of the DiT on `batch` (best of `repeats`)."""
    model = HunyuanVideoDiT(DiTConfig.from_config(config.model))
    b = batch["latents"].shape[0]
    latents = jnp.asarray(batch["latents"], jnp.float32)
    inputs = (latents, jnp.full((b,), 500.0), jnp.asarray(batch["text_states"], jnp.float32),
              jnp.asarray(batch["text_mask"]), jnp.asarray(batch["pooled_text"], jnp.float32),
              jnp.full((b,), 6016.0))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)["params"]

    def loss(p, *args):
        return jnp.mean((model.apply({"params": p}, *args) - latents) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params, *inputs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, *inputs))
        times.append(time.perf_counter() - t0)
    return b / min(times), min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker_count values to time")
    parser.add_argument("--latent", default="5,8,8", help="latent T,H,W of every record")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = tiny.get_config()
    latent = tuple(int(v) for v in args.latent.split(","))
    base = DataConfig.from_config(config.data)
    source = RandomClipSource(args.records, [latent], base.spec, seed=0, latent_dtype=base.latent_dtype,
                              text_dtype=base.text_dtype)
    record_bytes = len(serialize(source[0]))
    print(f"records: {args.records} of latents {latent}x{base.latent_channels} {base.latent_dtype}, text "
          f"{base.text_len}x{base.text_dim} {base.text_dtype} ({record_bytes} bytes each); global batch "
          f"{base.global_batch_size}; {os.cpu_count()} CPU cores; jax {jax.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        paths = write_shards(folder, source, 4)
        rates = {}
        for workers in (int(w) for w in args.workers.split(",")):
            data = DataConfig.from_config({**config.data.to_dict(), "source": "arrayrecord", "path": ",".join(paths),
                                           "worker_count": workers})
            rates[workers] = pipeline_rate(data, args.batches)
            print(f"pipeline, {workers} worker processes ({data.read_threads} read threads): "
                  f"{rates[workers]:,.0f} records/s")
        batch = next(make_train_pipeline(DataConfig.from_config(
            {**config.data.to_dict(), "source": "arrayrecord", "path": ",".join(paths)}), 0, 1, seed=0))
    consumed, seconds = train_step_rate(config, batch, args.repeats)
    tokens = int(np.prod(latent) // (config.model.patch_size ** 2)) + base.text_len
    print(f"tiny DiT train step (jitted fwd+bwd, batch {base.global_batch_size}, {tokens} tokens/sample): "
          f"{seconds * 1e3:.1f} ms/step = {consumed:,.0f} records/s")
    for workers, rate in rates.items():
        print(f"ratio pipeline / train step, {workers} workers: {rate / consumed:.1f}x")


if __name__ == "__main__":
    main()
