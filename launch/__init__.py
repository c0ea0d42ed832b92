"""Launch scripts: launch/tpu.py takes a training run from nothing to a Cloud TPU slice (see launch/README.md)."""
