"""The one table that maps logical axis names (used by every parameter and large activation) to mesh axes.

Mesh axes are ('data', 'fsdp', 'sequence', 'tensor'). Changing a parallelism strategy means editing this table or
passing other rules, never the model.
"""

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),          # the stacked (scanned) block axis
    ("embed", "fsdp"),         # hidden size D: FSDP shards it
    ("text_embed", None),      # LLM state width (input of the text projection)
    ("mlp", "tensor"),         # MLP width and modulation outputs
    ("heads", "tensor"),       # attention heads
    ("kv", None),              # head dim
    ("norm", None),            # norm scales and biases
    ("vae_channels", None),    # VAE conv channels
    ("vocab", "tensor"),       # text-encoder embeddings
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),       # image tokens (and the joint image+text sequence of single blocks)
    ("text_seq", None),        # text tokens: replicated over the sequence axis
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("frames", None),          # VAE activations [B, T, H, W, C]: shard rows of the image over 'sequence'
    ("height", "sequence"),
    ("width", None),
    ("act_vae_channels", None),
)
