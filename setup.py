"""hyvideo_jax: HunyuanVideo in JAX/Flax, for TPU-pod training, Colab evaluation and PyTorch interop."""

from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"

INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "clu==0.0.12",
    "tensorflow-cpu==2.21.0",     # clu's TensorBoard metric writer imports it
    "tensorboard==2.21.0",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    "safetensors==0.8.0",
    "tqdm==4.70.1",
    "av==18.1.0",                 # PyAV: video decode (data.prepare) and mp4 encode (data.synthetic)
    "importlib_resources==7.1.0",  # tensorflow_datasets imports it when building or reading a dataset
    "mediapy==1.2.7",             # contact sheets (PNG) and videos shown in notebooks
    "imageio-ffmpeg==0.8.1",      # an ffmpeg binary for mediapy's inline videos where the system has none
    "matplotlib==3.11.2",         # loss curves (the demo, the evaluation notebook)
    "transformers==5.24.0",       # tokenizers (the demo's are built in code; released ones are read from folders)
]

EXTRAS_REQUIRE = {
    # Converting PyTorch checkpoints (.pt files, bf16 safetensors) needs torch.
    "torch": ["torch==2.13.0"],
    # Ground truth for the parity tests comes from the PyTorch references.
    "test": [
        "torch==2.13.0",
        "diffusers==0.42.1",
        "peft==0.21.2",               # diffusers' LoRA loaders (the LoRA format tests)
        "safetensors==0.8.0",
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",        # the suite runs on both cores: XLA compiles are mostly single-threaded
        "nbclient==0.11.0",           # runs notebooks/evaluate_checkpoint.ipynb top to bottom
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        # libtpu describes TPU topologies, so the AOT tests compile for TPU pods on a machine without TPUs.
        f"jax[tpu]=={JAX_VERSION}",
    ],
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
}

setup(
    name="hyvideo_jax",
    version="0.1.0",
    description="HunyuanVideo (causal 3D VAE + dual/single-stream DiT) in JAX/Flax for TPU pods",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hyvideo_jax", "hyvideo_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
