"""Named TPU slices: the 13B presets sized for one slice each, as the AOT table in the README measured them.

    python -m hyvideo_jax.train --config=configs/v5p_8_lora.py --workdir=gs://bucket/run ...
    python -m launch.aot_presets            # AOT-compile every preset for its topology (minutes each)

`slice_preset(config, ...)` sets the mesh, the global batch (one sample per data-parallel group: data × fsdp), the
remat policy chosen from the README's AOT table ("attention" keeps the attention residuals, so attention is never
recomputed, where it fits; "full" otherwise), the chip's splash block sizes, and the `config.slice` section that
the launch scripts and `launch/aot_presets.py` read: the topology, the Cloud TPU accelerator type, and the video
size the preset was measured at.
"""

import ml_collections

# Splash block sizes (query, key/value, key/value compute; the backward uses the same) per TPU generation, for head
# dim 128. Starting points from published JAX configs, not tuned on hardware here: maxdiffusion's Wan (video DiT)
# on v6e uses q 2048, kv 2048, kv compute 1024 (MaxText's LLM configs 2048 throughout). On v5p the backward's dkv
# kernel at 2048 / 2048 / 1024 needs 23.6 MiB of scoped VMEM against a limit of 16 (AOT compile of the 13B step:
# CompileTimeScopedVmemOom), so 1024 there. The AOT compile of each preset checks that the kernels fit.
SPLASH_BLOCKS = {"v5p": (1024, 1024, 1024), "v6e": (2048, 2048, 1024)}


def splash_blocks(config, chip: str):
    """Set `config.model.splash_block_*` to the table's sizes for a TPU generation ('v5p', 'v6e'); others keep the
    config's own."""
    if chip in SPLASH_BLOCKS:
        q, kv, kv_compute = SPLASH_BLOCKS[chip]
        config.model.splash_block_q, config.model.splash_block_kv = q, kv
        config.model.splash_block_kv_compute = kv_compute
    return config


def slice_preset(config, *, topology: str, accelerator_type: str, ici, dcn=(1, 1, 1, 1), frames: int = 129,
                 height: int = 720, width: int = 1280, measured: str = "", remat_policy: str = "full"):
    """`config` fitted to one slice; `measured` quotes the AOT table's per-chip memory for it."""
    config.mesh.ici, config.mesh.dcn = tuple(ici), tuple(dcn)
    config.data.global_batch_size = ici[0] * ici[1] * dcn[0] * dcn[1]
    config.model.remat_policy = remat_policy
    config.model.attention_backend = "splash"
    config.model.sequence_parallel = "ulysses"
    splash_blocks(config, topology.split(":")[0])
    config.train.initialize_distributed = True
    config.slice = ml_collections.ConfigDict(dict(topology=topology, accelerator_type=accelerator_type,
                                                  frames=frames, height=height, width=width, measured=measured))
    return config
