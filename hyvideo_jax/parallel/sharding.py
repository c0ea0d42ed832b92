"""From logical axis names to shardings on a mesh, and parameters created or placed directly on it.

    mesh = create_mesh(config.mesh)
    params = init_sharded(model, mesh, jax.random.PRNGKey(0), *example_inputs)   # never whole on one device
    shardings = param_shardings(abstract_params, mesh)                           # for Orbax restore, jit
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hyvideo_jax.compilation import run_once_options
from hyvideo_jax.parallel.rules import LOGICAL_AXIS_RULES

Rules = Sequence[tuple[str, Any]]


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules: Rules = LOGICAL_AXIS_RULES):
    """NamedSharding for an array whose axes have these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def param_shardings(boxed_params, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """Tree of NamedShardings for a tree of `nn.Partitioned` (boxed) params or their ShapeDtypeStructs (a whole
    boxed TrainState too: unboxed leaves are replicated). The one place logical names become mesh shardings; a
    dimension its mesh axes do not divide evenly (e.g. a vocabulary of 49,409 over 2 devices) is replicated."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, rules)

    def fit(sharding, value):
        shape = tuple(getattr(value, "shape", ()))
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        spec = [None if axes is not None and size % _axes_size(mesh, axes) else axes for axes, size in zip(spec, shape)]
        return NamedSharding(mesh, PartitionSpec(*spec))
    return jax.tree_util.tree_map(fit, shardings, nn.unbox(boxed_params))


def _axes_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def abstract_params(model: nn.Module, *example_inputs, rng=None):
    """Boxed ShapeDtypeStructs of `model.init(...)['params']`, without allocating anything."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return jax.eval_shape(lambda: model.init(rng, *example_inputs))["params"]


def init_sharded(model: nn.Module, mesh: Mesh, rng, *example_inputs, rules: Rules = LOGICAL_AXIS_RULES):
    """`model.init` compiled with `out_shardings`, so each device creates only its own shard of every parameter."""
    boxed = abstract_params(model, *example_inputs, rng=rng)
    shardings = param_shardings(boxed, mesh, rules)

    def init(r):
        with nn.logical_axis_rules(rules):
            return nn.unbox(model.init(r, *example_inputs)["params"])
    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings, compiler_options=run_once_options())(rng)


def place_params(params, boxed_or_shardings, mesh: Mesh | None = None, rules: Rules = LOGICAL_AXIS_RULES):
    """Put a host tree (e.g. converted NumPy params) on the mesh leaf by leaf."""
    shardings = boxed_or_shardings
    if mesh is not None:
        shardings = param_shardings(boxed_or_shardings, mesh, rules)
    return jax.tree_util.tree_map(jax.device_put, params, shardings)


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, batch: int | None = None) -> NamedSharding:
    """Arrays [B, ...] split on their leading axis over the mesh axes of the logical 'batch' axis ('data', 'fsdp'),
    replicated otherwise; given `batch`, replicated when B does not divide over them (a single video on an FSDP mesh:
    the model's constraints still spread its work)."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)
    if batch is not None and batch % _axes_size(mesh, spec[0] or ()):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, spec)


def process_rows(sharding, batch: int, process_index: int | None = None):
    """The rows of a [batch, ...] array placed by `sharding` that the devices of process `process_index` (default:
    this one) hold, ascending. Processes whose devices share a batch shard (the mesh's sequence or tensor axis
    spanning hosts) get the same rows: they must read the same records."""
    import numpy as np
    process = jax.process_index() if process_index is None else process_index
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map((batch,)).items():
        if device.process_index == process:
            rows.update(range(*index[0].indices(batch)))
    return np.asarray(sorted(rows), np.int64)


def mesh_axes_of(logical: str, sizes: dict[str, int], rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes (of size > 1 in `sizes`) that a logical axis maps to under `rules` (default: the rules in
    effect, `nn.logical_axis_rules`, else LOGICAL_AXIS_RULES): what code placing work by hand (shard_map around a
    kernel, sequence parallelism) reads instead of naming mesh axes itself."""
    rules = rules if rules is not None else (nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES)
    for name, target in rules:
        if name == logical:
            axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
            return tuple(a for a in axes if sizes.get(a, 1) > 1)
    return ()


def split_or_warn(what: str, size: int, axes: tuple[str, ...], sizes: dict[str, int], advice: str):
    """`axes` when `size` divides over them (their product), else None with a warning: the work of that dimension
    would then be repeated on every device of those axes."""
    import math
    import warnings
    n = math.prod(sizes[a] for a in axes)
    if not axes or size % n == 0:
        return axes or None
    warnings.warn(f"{what} of {size} does not divide over the mesh axes {axes} of size {n}: each of those {n} "
                  f"devices computes all of it ({n}× the work). {advice}", stacklevel=3)
    return None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_targets(model: nn.Module, example_inputs, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """(ShapeDtypeStructs carrying the rules' shardings on `mesh`, those shardings) of `model`'s parameters: the
    targets Orbax restores into and conversions place onto."""
    boxed = abstract_params(model, *example_inputs)
    shardings = param_shardings(boxed, mesh, rules)
    targets = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                     nn.unbox(boxed), shardings)
    return targets, shardings
