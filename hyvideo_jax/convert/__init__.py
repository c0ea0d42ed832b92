"""PyTorch ↔ Flax weight conversion for the DiT (official and diffusers layouts) and the VAE."""

from hyvideo_jax.convert.dit import load_torch_dit, save_torch_dit
from hyvideo_jax.convert.text_encoders import load_clip_text, load_llama, sharding_table
from hyvideo_jax.convert.vae import load_torch_vae, save_torch_vae
from hyvideo_jax.convert.vision import load_clip_vision, load_llava_vision

__all__ = ["load_clip_text", "load_clip_vision", "load_llama", "load_llava_vision", "load_torch_dit", "load_torch_vae",
           "save_torch_dit", "save_torch_vae", "sharding_table"]
