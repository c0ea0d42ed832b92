"""Tiny random-weight diffusers transformers and matching inputs, the ground truth of the DiT tests."""

import numpy as np
import torch

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
            num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24, rope_axes_dim=(4, 6, 6))


def diffusers_dit(seed: int = 0, **overrides):
    """A diffusers HunyuanVideoTransformer3DModel with random weights, norms perturbed away from 1/0 too."""
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def dit_inputs(cfg: dict, batch=2, frames=3, height=6, width=10, text_len=7, valid=(5, 1), seed=1):
    """Inputs in diffusers' layout (torch, channel-first) for a config dict of diffusers arguments."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], frames, height, width, generator=g)
    t = torch.tensor([500.0, 20.0, 999.0, 1.0][:batch])
    text = torch.randn(batch, text_len, cfg["text_embed_dim"], generator=g)
    mask = torch.zeros(batch, text_len, dtype=torch.int64)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    guidance = torch.tensor([6016.0, 1000.0, 3504.0, 7008.0][:batch]) if cfg["guidance_embeds"] else None
    return x, t, text, mask, pooled, guidance


def diffusers_forward(model, inputs) -> np.ndarray:
    """diffusers output as channel-last NumPy [B, T, H, W, C]."""
    x, t, text, mask, pooled, guidance = inputs
    with torch.no_grad():
        out = model(x, t, text, mask, pooled, guidance, return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def jax_inputs(inputs):
    """The same inputs for our model: channel-last latents, NumPy arrays."""
    x, t, text, mask, pooled, guidance = inputs
    return (x.permute(0, 2, 3, 4, 1).numpy(), t.numpy(), text.numpy(), mask.numpy(), pooled.numpy(),
            None if guidance is None else guidance.numpy())


def relative_error(ours, ref) -> float:
    """max |ours − ref| relative to the output scale max |ref|."""
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref)) / np.max(np.abs(ref)))
