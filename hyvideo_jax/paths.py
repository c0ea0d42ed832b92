"""Paths users give (workdirs, data, weights, outputs) are local or in cloud storage (`gs://bucket/...`); this is
where the difference is handled, so that every command takes either.

Our own reads and writes go through `etils.epath`. Orbax takes absolute paths (`resolve`). Libraries that read only
local files (torch.load, safetensors' memory-mapped reader) get a local copy of a cloud file (`local_copy`), made once
per file into a cache folder ($HYVIDEO_JAX_CACHE, default ~/.cache/hyvideo_jax) and reused while its size matches;
libraries that write only local files write into a local folder that is then copied up (`writable_folder`,
`writable_file`).
"""

import contextlib
import hashlib
import os
import tempfile
from typing import Iterator

from etils import epath


def is_cloud(path) -> bool:
    """True for a URL-like path (gs://, s3://, ...)."""
    return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
    """`path` as an epath.Path: a local one made absolute (Orbax needs absolute paths), a cloud one as given."""
    path = os.fspath(path)
    return epath.Path(path if is_cloud(path) else os.path.abspath(path))


def cache_folder() -> str:
    return os.environ.get("HYVIDEO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hyvideo_jax")


def local_copy(path) -> str:
    """A local path holding the file at `path`: itself if local, else a cached copy of the cloud file."""
    path = os.fspath(path)
    if not is_cloud(path):
        return path
    source = epath.Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no file at {path}")
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    target = os.path.join(cache_folder(), key, source.name)
    size = source.stat().length
    if not (os.path.exists(target) and os.path.getsize(target) == size):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".partial"
        source.copy(partial, overwrite=True)
        os.replace(partial, target)
    return target


@contextlib.contextmanager
def writable_folder(path) -> Iterator[str]:
    """A local folder to write `path`'s files into: `path` itself when local (created), else a temporary folder whose
    files are copied into the cloud folder when the block ends without an error (for writers of local files only:
    torch.save, safetensors)."""
    path = os.fspath(path)
    if not is_cloud(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory() as local:
        yield local
        target = epath.Path(path)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(local)):
            epath.Path(os.path.join(local, name)).copy(target / name, overwrite=True)


@contextlib.contextmanager
def writable_file(path) -> Iterator[str]:
    """A local file name to write `path` to (itself when local, its folder created), uploaded at the end when cloud;
    files written beside it (e.g. FILE.config.json) go along."""
    path = os.fspath(path)
    if not is_cloud(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        yield path
        return
    folder, name = path.rsplit("/", 1)
    with writable_folder(folder) as local:
        yield os.path.join(local, name)
