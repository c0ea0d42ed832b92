"""Convert HunyuanVideo transformer weights between PyTorch (official / diffusers) and our Flax format.

  python -m hyvideo_jax.convert to-flax  --src=mp_rank_00_model_states.pt --out=ckpt/dit
  python -m hyvideo_jax.convert to-torch --src=ckpt/dit --out=hunyuan_diffusers --layout=diffusers
  python -m hyvideo_jax.convert to-torch --src=mp_rank_00_model_states.pt --out=folder --layout=diffusers
  python -m hyvideo_jax.convert to-torch --src=WORKDIR [--step=N] [--ema] --out=folder
  python -m hyvideo_jax.convert lora-to-torch --src=LORA_WORKDIR [--step=N] [--ema] --out=lora.safetensors

`to-flax` reads an official `.pt` (also fp8 with its `*_map.pt`), a diffusers folder or a safetensors file and writes
an Orbax checkpoint + config.json. `to-torch` reads our folder or any PyTorch source and writes the chosen layout, so
official ↔ diffusers works in one step. A training workdir is a source too (`--step=N`, default the latest; `--ema`
for its EMA parameters), so what was trained exports in one step. Tensors stream one at a time with a progress bar.
`--model=HYVideo-T/2-I2V-16ch` (a released transformer's name) says which model a PyTorch checkpoint holds where its
tensors cannot: the image-to-video token_replace model has the text-to-video tensors.
"""

import argparse
import dataclasses
import sys

import jax

from hyvideo_jax.convert.dit import load_torch_dit, save_torch_dit
from hyvideo_jax.convert.dit_configs import RELEASED
from hyvideo_jax.convert.flax_io import (is_flax_model, is_training_workdir, load_flax_model, save_flax_model,
                                         run_config, training_config, training_params)
from hyvideo_jax.models.dit import DiTConfig


def _load(args):
    if args.model and (is_training_workdir(args.src) or is_flax_model(args.src)):
        raise ValueError(f"--model names the model of a PyTorch checkpoint; {args.src} brings its own config")
    if is_training_workdir(args.src):
        from hyvideo_jax.parallel.mesh import MeshConfig, create_mesh
        from hyvideo_jax.convert.dit_sources import load_dit
        # The run's weights as the sampler reads them (a LoRA run's adapters merged into its base), on one device.
        config = run_config(args.src)
        mesh = create_mesh(MeshConfig(ici=(1, 1, 1, 1)), jax.devices()[:1])
        cfg, params, description = load_dit(config, workdir=args.src, step=args.step, use_ema=args.ema,
                                            require_ema=args.ema, mesh=mesh)
        params = jax.device_get(params)
        print(f"read {description}", file=sys.stderr)
        if args.dtype:
            params = jax.tree.map(lambda x: x.astype(jax.numpy.dtype(args.dtype)), params)
            cfg = dataclasses.replace(cfg, param_dtype=args.dtype)
        return cfg, params
    if args.step is not None or args.ema:
        raise ValueError(f"--step and --ema select a checkpoint of a training workdir; {args.src} is not one")
    if is_flax_model(args.src):
        config, params = load_flax_model(args.src, kind="dit")
        return DiTConfig.from_config(config), params
    return load_torch_dit(args.src, layout=args.layout_in, config=args.model, fp8_map=args.fp8_map,
                          load_key=args.load_key, dtype=args.dtype)


def _export_lora(args) -> tuple[str, int]:
    """The adapters of a LoRA run (`--step`, `--ema`) as a diffusers LoRA file."""
    import flax.linen as nn

    from hyvideo_jax.convert.lora import save_diffusers_lora
    from hyvideo_jax.lora import LoRAConfig, init_adapters
    from hyvideo_jax.models.dit import HunyuanVideoDiT, example_inputs
    from hyvideo_jax.parallel.sharding import abstract_params
    if not is_training_workdir(args.src):
        raise ValueError(f"{args.src} is not a training workdir (no checkpoints/)")
    run = training_config(args.src)
    cfg, lora_config = DiTConfig.from_config(run["model"]), LoRAConfig.from_config(run.get("lora"))
    if not lora_config.enabled:
        raise ValueError(f"{args.src} is a full fine-tuning run (lora.rank 0): export it with to-torch")
    targets = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), jax.eval_shape(
        lambda: init_adapters(abstract_params(HunyuanVideoDiT(cfg), *example_inputs(cfg)), lora_config,
                              jax.random.PRNGKey(0))))
    adapters, description = training_params(args.src, nn.unbox(targets), step=args.step, use_ema=args.ema,
                                            require_ema=args.ema)
    print(f"read {description}", file=sys.stderr)
    path = save_diffusers_lora(cfg, adapters, lora_config, args.out)
    return path, sum(x.size for x in jax.tree_util.tree_leaves(adapters))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyvideo_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("to-flax", "PyTorch checkpoint → our Orbax folder"),
                        ("to-torch", "our folder (or a PyTorch checkpoint) → PyTorch layout")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--src", required=True, help="checkpoint file or folder to read, or a training workdir")
        p.add_argument("--step", type=int, default=None, help="training workdir: the step (default: the latest)")
        p.add_argument("--ema", action="store_true", help="training workdir: its EMA parameters")
        p.add_argument("--out", required=True, help="where to write")
        p.add_argument("--layout-in", choices=("official", "diffusers"), default=None,
                       help="layout of a PyTorch --src (detected when omitted)")
        p.add_argument("--fp8-map", default=None, help="scale map of an official fp8 checkpoint")
        p.add_argument("--load-key", default=None, help="sub-dict of the .pt holding the weights (default: module)")
        p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="cast parameters (default: keep the checkpoint's dtype)")
        p.add_argument("--model", choices=sorted(RELEASED), default=None,
                       help="the released transformer a PyTorch --src holds (an official image-to-video "
                            "token_replace checkpoint needs it: its tensors are the text-to-video ones)")
        if name == "to-torch":
            p.add_argument("--layout", choices=("diffusers", "official"), default="diffusers")
    p = sub.add_parser("lora-to-torch", help="a LoRA training workdir's adapters → a diffusers LoRA .safetensors")
    p.add_argument("--src", required=True, help="the LoRA run's workdir")
    p.add_argument("--out", required=True, help="the .safetensors to write")
    p.add_argument("--step", type=int, default=None, help="the step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="its EMA adapters")
    args = parser.parse_args(argv)
    if args.command == "lora-to-torch":
        try:
            path, n = _export_lora(args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
            return 2
        print(f"wrote {path} ({n:,} adapter parameters)")
        return 0
    try:
        config, params = _load(args)
        if args.command == "to-flax":
            save_flax_model(args.out, "dit", config.to_dict(), params)
        else:
            save_torch_dit(config, params, args.out, layout=args.layout)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out} ({n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
