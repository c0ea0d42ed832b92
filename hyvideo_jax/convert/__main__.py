"""Convert HunyuanVideo transformer weights between PyTorch (official / diffusers) and our Flax format.

  python -m hyvideo_jax.convert to-flax  --src=mp_rank_00_model_states.pt --out=ckpt/dit
  python -m hyvideo_jax.convert to-torch --src=ckpt/dit --out=hunyuan_diffusers --layout=diffusers
  python -m hyvideo_jax.convert to-torch --src=mp_rank_00_model_states.pt --out=folder --layout=diffusers

`to-flax` reads an official `.pt` (also fp8 with its `*_map.pt`), a diffusers folder or a safetensors file and writes
an Orbax checkpoint + config.json. `to-torch` reads our folder or any PyTorch source and writes the chosen layout, so
official ↔ diffusers works in one step. Tensors stream one at a time with a progress bar.
"""

import argparse
import sys

import jax

from hyvideo_jax.convert.dit import load_torch_dit, save_torch_dit
from hyvideo_jax.convert.flax_io import is_flax_model, load_flax_model, save_flax_model
from hyvideo_jax.models.dit import DiTConfig


def _load(args):
    if is_flax_model(args.src):
        config, params = load_flax_model(args.src, kind="dit")
        return DiTConfig.from_config(config), params
    return load_torch_dit(args.src, layout=args.layout_in, fp8_map=args.fp8_map, load_key=args.load_key,
                          dtype=args.dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyvideo_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("to-flax", "PyTorch checkpoint → our Orbax folder"),
                        ("to-torch", "our folder (or a PyTorch checkpoint) → PyTorch layout")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--src", required=True, help="checkpoint file or folder to read")
        p.add_argument("--out", required=True, help="where to write")
        p.add_argument("--layout-in", choices=("official", "diffusers"), default=None,
                       help="layout of a PyTorch --src (detected when omitted)")
        p.add_argument("--fp8-map", default=None, help="scale map of an official fp8 checkpoint")
        p.add_argument("--load-key", default=None, help="sub-dict of the .pt holding the weights (default: module)")
        p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="cast parameters (default: keep the checkpoint's dtype)")
        if name == "to-torch":
            p.add_argument("--layout", choices=("diffusers", "official"), default="diffusers")
    args = parser.parse_args(argv)
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
