"""The transformer's weights for inference from any source, placed on a mesh by the rules table: a training workdir
(its EMA or raw parameters; a LoRA run's adapters merged into its `train.init_from` base), a folder written by
`python -m hyvideo_jax.convert to-flax`, or PyTorch weights; and a LoRA file merged into them.

    cfg, params, description = load_dit(config, checkpoint="ckpt/dit", mesh=mesh)
    params = with_lora(params, cfg, "my_lora.safetensors", mesh)
"""

import dataclasses

import flax.linen as nn
import jax

from hyvideo_jax.lora import LoRAConfig, init_adapters, merge
from hyvideo_jax.models.dit import DiTConfig, HunyuanVideoDiT, example_inputs
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES
from hyvideo_jax.parallel.sharding import abstract_params, param_shardings, param_targets


def inference_config(config) -> DiTConfig:
    """`config.model` as the transformer runs for inference: no remat (nothing is recomputed without a backward)."""
    return dataclasses.replace(DiTConfig.from_config(config.model), remat_policy="none")


def load_dit(config, *, workdir=None, step: int | None = None, checkpoint=None, torch_weights=None,
             use_ema: bool = True, require_ema: bool = False, mesh, rules=LOGICAL_AXIS_RULES):
    """(DiTConfig, params placed on `mesh` by the rules table, description) from exactly one source: a training
    `workdir` (architecture from `config.model`), a `checkpoint` folder written by `convert to-flax`, or PyTorch
    `torch_weights` (official `.pt`, `*_fp8.pt`, diffusers folder, safetensors); the last two bring their own
    architecture and stored dtype, and `config.model` says how to run it (dtype, attention, sequence parallelism).
    A LoRA run's workdir (`lora.rank` > 0) gives its adapters merged into the weights of its `train.init_from`."""
    given = {k: v for k, v in dict(workdir=workdir, checkpoint=checkpoint, torch_weights=torch_weights).items() if v}
    if len(given) != 1:
        raise ValueError(f"give exactly one of workdir, checkpoint, torch_weights; got {sorted(given) or 'none'}")
    from hyvideo_jax.convert.dit import load_dit_sharded
    run = inference_config(config)
    if workdir:
        from hyvideo_jax.convert.flax_io import training_params
        adapters = LoRAConfig.from_config(config.get("lora"))
        if not adapters.enabled:
            targets, _ = param_targets(HunyuanVideoDiT(run), example_inputs(run), mesh, rules)
            params, description = training_params(workdir, targets, step=step, use_ema=use_ema,
                                                  require_ema=require_ema)
            return run, params, description
        # A LoRA run: its checkpoints hold the adapters of the weights in train.init_from; merge them once.
        base_source = config.get("train", {}).get("init_from", "")
        if not base_source:
            raise ValueError("lora.rank > 0: a LoRA run adapts the weights in train.init_from, which this config "
                             "does not name")
        _, base = load_dit_sharded(base_source, mesh, like=run, strict=True, rules=rules)
        boxed = jax.eval_shape(lambda: init_adapters(
            abstract_params(HunyuanVideoDiT(run), *example_inputs(run)), adapters, jax.random.PRNGKey(0)))
        shardings = param_shardings(boxed, mesh, rules)
        targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                               shardings)
        trained, description = training_params(workdir, targets, step=step, use_ema=use_ema,
                                               require_ema=require_ema)
        with jax.set_mesh(mesh):
            params = jax.jit(lambda b, a: merge(b, a, adapters))(base, trained)
        return run, params, f"{description}: LoRA rank {adapters.rank} merged into {base_source}"
    source = checkpoint or torch_weights
    cfg, params = load_dit_sharded(source, mesh, like=run, rules=rules)
    return cfg, params, (f"converted folder {source}" if checkpoint else f"PyTorch weights {source}")


def with_lora(params, dit_config: DiTConfig, lora_file, mesh):
    """`params` with a LoRA file (any format `convert.lora.load_lora` reads) merged in, on the params' shardings."""
    from hyvideo_jax.convert.lora import load_lora
    adapters, adapter_config = load_lora(lora_file, dit_config)
    with jax.set_mesh(mesh):
        return jax.jit(lambda p, a: merge(p, a, adapter_config))(params, adapters)
