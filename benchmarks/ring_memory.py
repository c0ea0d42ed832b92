"""Per-device compiled temporary memory of ring attention forward+backward over a sequence axis of 8 simulated CPU
devices, for the 13B DiT's attention (24 heads × 128, bf16, batch 1, 256 text tokens) at 720×1280 and growing
frame counts up to 129 frames (118,800 image tokens).

    python -m benchmarks.ring_memory [--devices=8 --heads=24 --head-dim=128 --frames 17 33 65 129]
    python -m benchmarks.ring_memory --topology=v5p:2x2x2     # per TPU chip, AOT for the topology (libtpu, no TPU)

Nothing is executed: the program is only compiled for abstract shapes (`compiled.memory_analysis()`). The image
q/k/v enter split over the sequence axis and the text replicated (`joint_attention_split`, as in the DiT), so no
resharding is counted. Blockwise ring attention with its own backward keeps a few [512 × 512] tiles per device
besides q, k, v, the output, the log-sum-exp and the fp32 accumulators: temporaries grow linearly with tokens.
XLA:CPU computes bf16 in fp32 (its float normalization), so CPU figures overstate what bf16 arrays take on an
accelerator; `--topology` compiles for TPU chips instead.
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65, 129])
    parser.add_argument("--topology", default=None, help="a TPU topology of --devices chips, e.g. v5p:2x2x2")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax  # the device count must be set before JAX starts
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
    from hyvideo_jax.parallel.sequence import joint_attention_split

    devices = None
    if args.topology:
        from hyvideo_jax.aot import topology_devices
        devices = topology_devices(args.topology)
    mesh = create_mesh(MeshConfig(ici=(1, 1, args.devices, 1)), devices)
    image, replicated = NamedSharding(mesh, P(None, "sequence")), NamedSharding(mesh, P())

    def temp_bytes(n_img):
        def loss(qi, qt, ki, kt, vi, vt, seg):
            out = joint_attention_split(qi, qt, ki, kt, vi, vt, seg, method="ring")
            return sum(jnp.sum(x.astype(jnp.float32)) for x in out)
        img = jax.ShapeDtypeStruct((1, n_img, args.heads, args.head_dim), jnp.bfloat16, sharding=image)
        txt = jax.ShapeDtypeStruct((1, args.text, args.heads, args.head_dim), jnp.bfloat16, sharding=replicated)
        seg = jax.ShapeDtypeStruct((1, args.text), jnp.int32, sharding=replicated)
        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(img, txt, img, txt, img, txt,
                                                                              seg).compile()
        return compiled.memory_analysis()

    where = f"{args.topology} TPU chips" if args.topology else "simulated CPU devices"
    print(f"ring attention forward+backward per device: sequence axis of {args.devices} {where}, "
          f"{args.heads} heads × {args.head_dim}, bf16, batch 1, {args.text} text tokens, 720×1280")
    print(f"{'frames':>6s} {'image tokens':>13s} {'per device':>11s} {'temp (MiB)':>11s} {'args (MiB)':>11s} "
          f"{'compile (s)':>12s}")
    base = None
    for frames in args.frames:
        n_img = ((frames - 1) // 4 + 1) * (720 // 16) * (1280 // 16)  # latent frames × 45 × 80 patches
        start = time.perf_counter()
        analysis = temp_bytes(n_img)
        seconds = time.perf_counter() - start
        temp = analysis.temp_size_in_bytes
        base = base or (n_img, temp)
        print(f"{frames:6d} {n_img:13,d} {n_img // args.devices:11,d} {temp / 2**20:11.1f} "
              f"{analysis.argument_size_in_bytes / 2**20:11.1f} {seconds:12.1f}   temp ×{temp / base[1]:.2f} for "
              f"×{n_img / base[0]:.2f} tokens", flush=True)


if __name__ == "__main__":
    main()
