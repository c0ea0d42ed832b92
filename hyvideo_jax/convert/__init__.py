"""PyTorch ↔ Flax weight conversion for the DiT (official and diffusers layouts) and the VAE."""
