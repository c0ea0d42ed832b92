"""Device meshes over the axes ('data', 'fsdp', 'sequence', 'tensor'), from the config's `mesh` section.

`ici` is the mesh within a slice (fast interconnect), `dcn` across slices (data-centre network); one entry of `ici`
may be -1 to take the remaining devices. A multi-slice pod uses `create_hybrid_device_mesh` so that only the axes
with dcn > 1 (usually `data`) cross slices.
"""

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from hyvideo_jax.config_fields import from_fields
from hyvideo_jax.parallel.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    ici: tuple[int, int, int, int] = (1, -1, 1, 1)  # (data, fsdp, sequence, tensor) within a slice
    dcn: tuple[int, int, int, int] = (1, 1, 1, 1)   # the same axes across slices

    def __post_init__(self):
        object.__setattr__(self, "ici", tuple(int(x) for x in self.ici))
        object.__setattr__(self, "dcn", tuple(int(x) for x in self.dcn))
        for name in ("ici", "dcn"):
            shape = getattr(self, name)
            if len(shape) != len(MESH_AXES):
                raise ValueError(f"mesh.{name}: needs one size per axis {MESH_AXES}, got {shape}")
            if any(x == 0 or x < -1 for x in shape) or (name == "dcn" and -1 in shape) or shape.count(-1) > 1:
                raise ValueError(f"mesh.{name}: sizes must be positive (ici may have one -1), got {shape}")

    @classmethod
    def from_config(cls, config: "MeshConfig | Mapping[str, Any]") -> "MeshConfig":
        return from_fields(cls, config, "mesh")

    def resolve(self, n_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Concrete (ici, dcn) shapes for `n_devices`, with -1 filled in; a clear error if they do not fit."""
        n_slices = math.prod(self.dcn)
        if n_devices % n_slices:
            raise ValueError(f"mesh.dcn {self.dcn} needs a multiple of {n_slices} devices, got {n_devices}")
        per_slice = n_devices // n_slices
        ici = list(self.ici)
        if -1 in ici:
            known = math.prod(x for x in ici if x != -1)
            if per_slice % known:
                raise ValueError(f"mesh.ici {self.ici}: {per_slice} devices per slice do not divide by {known}")
            ici[ici.index(-1)] = per_slice // known
        if math.prod(ici) != per_slice:
            raise ValueError(f"mesh.ici {self.ici} holds {math.prod(ici)} devices, but there are {per_slice} "
                             f"per slice ({n_devices} devices, {n_slices} slices)")
        return tuple(ici), self.dcn


def create_mesh(config: "MeshConfig | Mapping[str, Any]", devices: Sequence[Any] | None = None) -> Mesh:
    """The global mesh with axes MESH_AXES; shape = ici × dcn per axis."""
    config = MeshConfig.from_config(config)
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = config.resolve(len(devices))
    if math.prod(dcn) > 1:
        slices = {getattr(d, "slice_index", 0) for d in devices}
        if len(slices) > 1:
            if len(slices) != math.prod(dcn):
                raise ValueError(f"mesh.dcn {dcn} describes {math.prod(dcn)} slices, the devices are on "
                                 f"{len(slices)}")
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
        else:  # one slice (CPU or GPU hosts): consecutive blocks of devices (processes, in order) play the slices
            n = len(MESH_AXES)
            grid = np.asarray(devices).reshape(tuple(dcn) + tuple(ici))
            grid = grid.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair])
            grid = grid.reshape([d * i for d, i in zip(dcn, ici)])
    else:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)
