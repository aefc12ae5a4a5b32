"""Convert diffusers' `SD3Transformer2DModel` weights into `MMDiT`.

`mmdit_kwargs(config)` maps `transformer/config.json` to `MMDiT` arguments;
`load_mmdit(mmdit, source)` assigns every weight from a `TensorSource` keyed
by diffusers' state-dict names (`pos_embed.proj.weight`,
`transformer_blocks.0.attn.to_q.weight`, ...). Separate q/k/v projections
are concatenated into the fused `*_qkv` kernels. Loading fails on a
missing tensor, a tensor of the wrong shape, an unused checkpoint tensor or
a model variable left unassigned.
"""

from keras_diffusion.converters.weight_loader import WeightLoader


def mmdit_kwargs(diffusers_config):
    """`MMDiT` keyword arguments from a diffusers transformer config dict.

    Examples:

    >>> kwargs = mmdit_kwargs({
    ...     "patch_size": 2, "in_channels": 16, "out_channels": 16,
    ...     "num_layers": 24, "attention_head_dim": 64,
    ...     "num_attention_heads": 24, "joint_attention_dim": 4096,
    ...     "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    ...     "pos_embed_max_size": 192,
    ... })
    >>> kwargs["hidden_dim"], kwargs["position_size"], kwargs["qk_norm"]
    (1536, 192, None)
    """
    config = dict(diffusers_config)
    hidden_dim = config["num_attention_heads"] * config["attention_head_dim"]
    in_channels = config.get("in_channels", 16)
    out_channels = config.get("out_channels") or in_channels
    if out_channels != in_channels:
        raise ValueError(
            f"in_channels={in_channels} and out_channels={out_channels} differ; "
            "MMDiT needs them equal."
        )
    caption_dim = config.get("caption_projection_dim", hidden_dim)
    if caption_dim != hidden_dim:
        raise ValueError(
            f"caption_projection_dim={caption_dim} must equal num_attention_heads "
            f"* attention_head_dim = {hidden_dim}."
        )
    if not config.get("pos_embed_max_size"):
        raise ValueError("The config has no pos_embed_max_size; SD3 needs one.")
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"Unsupported qk_norm {qk_norm!r}.")
    return {
        "hidden_dim": hidden_dim,
        "num_layers": config["num_layers"],
        "num_heads": config["num_attention_heads"],
        "position_size": config["pos_embed_max_size"],
        "patch_size": config.get("patch_size", 2),
        "latent_channels": in_channels,
        "context_dim": config["joint_attention_dim"],
        "pooled_dim": config["pooled_projection_dim"],
        "qk_norm": qk_norm,
        "dual_attention_layers": tuple(config.get("dual_attention_layers") or ()),
    }


def _norm(load, layer, name):
    if layer is not None:  # qk norms exist only with `qk_norm="rms_norm"`
        load.norm(layer, name)


def _mlp(load, mlp, prefix):
    load.linear(mlp.dense_1, f"{prefix}.net.0.proj")
    load.linear(mlp.dense_2, f"{prefix}.net.2")


def load_mmdit(mmdit, source):
    """Assign a diffusers `SD3Transformer2DModel` state dict to `mmdit`.

    Args:
        mmdit: an `MMDiT`, built or not (it is built first).
        source: a `TensorSource` with diffusers' state-dict names, e.g.
            `TensorSource.from_files("transformer/diffusion_pytorch_model.safetensors")`.

    Raises:
        KeyError: a tensor is missing.
        ValueError: a tensor has the wrong shape, a checkpoint tensor is left
            unused, or a model variable is left unassigned.

    Examples:

    A real checkpoint is loaded with
    `load_mmdit(model, TensorSource.from_files(path))`; an incomplete one
    fails naming the first missing tensor:

    >>> from keras_diffusion.converters.safetensors_reader import TensorSource
    >>> from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
    >>> model = MMDiT(hidden_dim=8, num_layers=1, num_heads=2, position_size=4,
    ...               latent_channels=4, context_dim=6, pooled_dim=5)
    >>> load_mmdit(model, TensorSource.from_dict({}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    KeyError: "Tensor 'pos_embed.proj.weight' is missing from the checkpoint ..."
    """
    if not mmdit.built:
        mmdit.build()
    load = WeightLoader(source, mmdit)
    d, size = mmdit.hidden_dim, mmdit.position_size

    load.conv(mmdit.patch_embedding, "pos_embed.proj")
    name = "pos_embed.pos_embed"
    table = load.get(name, (1, size * size, d), mmdit.position_embedding)
    load.assign(mmdit.position_embedding, table.reshape(size, size, d), name)

    embed = "time_text_embed"
    load.linear(mmdit.timestep_dense_1, f"{embed}.timestep_embedder.linear_1")
    load.linear(mmdit.timestep_dense_2, f"{embed}.timestep_embedder.linear_2")
    load.linear(mmdit.pooled_dense_1, f"{embed}.text_embedder.linear_1")
    load.linear(mmdit.pooled_dense_2, f"{embed}.text_embedder.linear_2")
    load.linear(mmdit.context_embedding, "context_embedder")

    for i, block in enumerate(mmdit.blocks):
        b = f"transformer_blocks.{i}"
        attn = f"{b}.attn"
        load.linear(block.x_modulation, f"{b}.norm1.linear")
        load.linear(block.context_modulation, f"{b}.norm1_context.linear")
        load.linear(block.x_qkv, *(f"{attn}.to_{s}" for s in "qkv"))
        load.linear(block.context_qkv, *(f"{attn}.add_{s}_proj" for s in "qkv"))
        _norm(load, block.x_query_norm, f"{attn}.norm_q")
        _norm(load, block.x_key_norm, f"{attn}.norm_k")
        _norm(load, block.context_query_norm, f"{attn}.norm_added_q")
        _norm(load, block.context_key_norm, f"{attn}.norm_added_k")
        load.linear(block.x_attention_output, f"{attn}.to_out.0")
        _mlp(load, block.x_mlp, f"{b}.ff")
        if not block.context_pre_only:
            load.linear(block.context_attention_output, f"{attn}.to_add_out")
            _mlp(load, block.context_mlp, f"{b}.ff_context")
        if block.dual_attention:
            attn2 = f"{b}.attn2"
            load.linear(block.x_qkv_2, *(f"{attn2}.to_{s}" for s in "qkv"))
            _norm(load, block.x_query_norm_2, f"{attn2}.norm_q")
            _norm(load, block.x_key_norm_2, f"{attn2}.norm_k")
            load.linear(block.x_attention_output_2, f"{attn2}.to_out.0")

    load.linear(mmdit.output_modulation, "norm_out.linear")
    load.linear(mmdit.output_projection, "proj_out")
    load.finish()
