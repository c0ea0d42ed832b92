"""Frozen-dataclass configs built from ml_collections sections: one way to read them and to fail on typos."""

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def from_fields(cls: type[T], config: "T | Mapping[str, Any]", section: str) -> T:
    """`cls` from an instance (returned as is), a dict or a ConfigDict; unknown keys fail naming `section`."""
    if isinstance(config, cls):
        return config
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {section} config field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**values)


def to_plain_dict(config) -> dict[str, Any]:
    """A dataclass config as JSON-friendly values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
