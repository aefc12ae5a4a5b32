"""Tiny SD3 / SD3.5 pipelines, and Stability single files written from them.

`build_pipeline(kind)` returns a random diffusers
`StableDiffusion3Img2ImgPipeline` (with T5) whose sizes a single file can
express: a file carries no config, so heads are 64 wide unless a q/k norm
says otherwise, and the VAE's group norms have 32 groups.

`stability_tensors(pipeline)` is the *inverse* of the converter under test,
written independently of it from the reference implementation's names:
diffusers' q/k/v are fused into `qkv`, the two-chunk AdaLN projections are
put back in (shift, scale) order, the VAE goes to the LDM layout (decoder
levels numbered from the narrowest, attention as 1x1 convolutions).
diffusers' own `from_single_file` is the judge of whether it is right.

`sd3_case(root)` and `sd35_case(root)` write the two layouts the tests load:
SD3's all-in-one file and SD3.5's repository folder, each next to the
diffusers folder of the same pipeline.
"""

import os
import shutil

import numpy as np
import sd3_fixtures
import torch
from safetensors.numpy import save_file

CONTEXT = 192  # CLIP-L + CLIP-G widths, and T5's width
TRANSFORMERS = {
    "sd3": dict(
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        qk_norm=None,
        dual_attention_layers=(),
    ),
    "sd35": dict(
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ),
}


def _clip(hidden, act, seed, identity_projection=False):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,
        projection_dim=hidden,
        hidden_act=act,
        max_position_embeddings=77,
        eos_token_id=49407,
        bos_token_id=49406,
        pad_token_id=1,
    )
    model = sd3_fixtures._randomise(CLIPTextModelWithProjection(config), seed)
    if identity_projection:
        with torch.no_grad():
            model.text_projection.weight.copy_(torch.eye(hidden))
    return model


def _t5(seed=5):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=512,
        d_model=CONTEXT,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = sd3_fixtures._randomise(T5EncoderModel(config), seed)
    with torch.no_grad():  # as stored in t5xxl_fp16.safetensors
        for param in model.parameters():
            param.copy_(param.half().float())
    return model


def build_pipeline(kind="sd3", identity_clip_l_projection=False):
    """A tiny random SD3 img2img pipeline (float32, with T5) for 32x32 images."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
    )
    from transformers import CLIPTokenizer, T5TokenizerFast

    torch.manual_seed(0)
    config = TRANSFORMERS[kind]
    transformer = SD3Transformer2DModel(
        sample_size=sd3_fixtures.TINY_SIZE // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        joint_attention_dim=CONTEXT,
        caption_projection_dim=config["attention_head_dim"]
        * config["num_attention_heads"],
        pooled_projection_dim=CONTEXT,
        pos_embed_max_size=16,
        **config,
    )
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )
    sd3_fixtures._randomise(transformer, 3)
    sd3_fixtures._randomise(vae, 4)
    folder = sd3_fixtures.write_clip_tokenizer_files(
        os.path.join(os.environ.get("TMPDIR", "/tmp"), "kd-clip-vocab")
    )
    vocab, merges = (os.path.join(folder, f) for f in ("vocab.json", "merges.txt"))
    return StableDiffusion3Img2ImgPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_clip(64, "quick_gelu", 1, identity_clip_l_projection),
        tokenizer=CLIPTokenizer(vocab, merges, model_max_length=77),
        text_encoder_2=_clip(128, "gelu", 2),
        tokenizer_2=CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77),
        text_encoder_3=_t5(),
        tokenizer_3=T5TokenizerFast.from_pretrained(
            sd3_fixtures.train_t5_sentencepiece()
        ),
    )


def _numpy(module):
    """A module's state dict as numpy arrays.

    A module on the meta device (a real-size model, for its shapes only)
    gives zero-strided arrays, which take no memory.
    """
    state = {}
    for name, value in module.state_dict().items():
        if value.is_meta:
            state[name] = np.broadcast_to(np.float32(0), tuple(value.shape))
        else:
            state[name] = value.detach().cpu().numpy().copy()
    return state


def _concatenate(arrays):
    if all(not any(a.strides) for a in arrays):  # shapes only (meta)
        shape = (sum(a.shape[0] for a in arrays),) + arrays[0].shape[1:]
        return np.broadcast_to(np.float32(0), shape)
    return np.concatenate(arrays)


def _swap_halves(array):
    half = array.shape[0] // 2
    return _concatenate([array[half:], array[:half]])


# diffusers name (under transformer_blocks.{i}) -> reference name (joint_blocks.{i})
_BLOCK_NAMES = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_FUSED = {  # reference qkv <- diffusers q, k, v (under the block)
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_TOP_NAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}


def mmdit_tensors(transformer):
    """The transformer's weights under Stability's `model.diffusion_model.*`."""
    state = _numpy(transformer)
    layers = transformer.config.num_layers
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    for leaf in ("weight", "bias"):
        for ours, theirs in _TOP_NAMES.items():
            out[f"{theirs}.{leaf}"] = state.pop(f"{ours}.{leaf}")
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap_halves(
            state.pop(f"norm_out.linear.{leaf}")
        )
        for i in range(layers):
            block, ref = f"transformer_blocks.{i}", f"joint_blocks.{i}"
            for fused, parts in _FUSED.items():
                names = [f"{block}.{p}.{leaf}" for p in parts]
                if names[0] in state:
                    out[f"{ref}.{fused}.{leaf}"] = _concatenate(
                        [state.pop(n) for n in names]
                    )
            for ours, theirs in _BLOCK_NAMES.items():
                name = f"{block}.{ours}.{leaf}"
                if name not in state:
                    continue
                value = state.pop(name)
                if ours == "norm1_context.linear" and i == layers - 1:
                    value = _swap_halves(value)  # AdaLayerNormContinuous
                out[f"{ref}.{theirs}.{leaf}"] = value
    assert not state, sorted(state)
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def vae_tensors(vae):
    """The VAE's weights in the LDM layout, under `first_stage_model.*`."""
    state = _numpy(vae)
    levels = len(vae.config.block_out_channels)
    out = {}
    for name, value in state.items():
        side, rest = name.split(".", 1)
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        parts = rest.split(".")
        if parts[0] == "conv_norm_out":
            rest = "norm_out." + parts[1]
        elif parts[0] in ("down_blocks", "up_blocks"):
            level = int(parts[1])
            kind = "down" if parts[0] == "down_blocks" else "up"
            if kind == "up":
                level = levels - 1 - level
            if parts[2] == "resnets":
                rest = f"{kind}.{level}.block.{'.'.join(parts[3:])}"
            else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                rest = f"{kind}.{level}.{kind}sample.conv.{parts[-1]}"
        elif parts[:2] == ["mid_block", "resnets"]:
            rest = f"mid.block_{int(parts[2]) + 1}.{'.'.join(parts[3:])}"
        elif parts[:2] == ["mid_block", "attentions"]:
            layer = ".".join(parts[3:-1])
            layer = {
                "group_norm": "norm",
                "to_q": "q",
                "to_k": "k",
                "to_v": "v",
                "to_out.0": "proj_out",
            }[layer]
            rest = f"mid.attn_1.{layer}.{parts[-1]}"
            if value.ndim == 2:  # stored as 1x1 convolutions
                value = value[:, :, None, None]
        out[f"first_stage_model.{side}.{rest}"] = value
    return out


def text_encoder_tensors(pipeline, prefixed=True, clip_l_projection=True):
    """{name: tensors} of clip_l, clip_g and t5xxl, Stability's names."""
    encoders = {
        "clip_l": _numpy(pipeline.text_encoder),
        "clip_g": _numpy(pipeline.text_encoder_2),
        "t5xxl": _numpy(pipeline.text_encoder_3),
    }
    encoders["t5xxl"].pop("encoder.embed_tokens.weight")  # tied to shared.weight
    if not clip_l_projection:
        encoders["clip_l"].pop("text_projection.weight")
    if prefixed:
        encoders = {
            name: {f"text_encoders.{name}.transformer.{k}": v for k, v in d.items()}
            for name, d in encoders.items()
        }
    return encoders


def write_all_in_one(pipeline, path):
    """One file: MMDiT, VAE, CLIP-L, CLIP-G and T5 (sd3_medium_incl_clips_t5xxl)."""
    tensors = {**mmdit_tensors(pipeline.transformer), **vae_tensors(pipeline.vae)}
    for encoder in text_encoder_tensors(pipeline).values():
        tensors.update(encoder)
    save_file(tensors, str(path))
    return str(path)


def write_separate(pipeline, folder, name="sd3.5_medium.safetensors"):
    """Stability's repository layout: the model file, `text_encoders/`.

    `clip_l.safetensors` lacks `text_projection.weight` (as Stability's
    does) and T5 is stored in float16 (`t5xxl_fp16.safetensors`).
    """
    os.makedirs(os.path.join(folder, "text_encoders"), exist_ok=True)
    tensors = {**mmdit_tensors(pipeline.transformer), **vae_tensors(pipeline.vae)}
    save_file(tensors, os.path.join(folder, name))
    encoders = text_encoder_tensors(pipeline, prefixed=False, clip_l_projection=False)
    encoders["t5xxl"] = {k: v.astype(np.float16) for k, v in encoders["t5xxl"].items()}
    for encoder, file in (
        ("clip_l", "clip_l"),
        ("clip_g", "clip_g"),
        ("t5xxl", "t5xxl_fp16"),
    ):
        path = os.path.join(folder, "text_encoders", f"{file}.safetensors")
        save_file(encoders[encoder], path)
    return os.path.join(folder, name)


TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
ALL_IN_ONE = "sd3_medium_incl_clips_t5xxl.safetensors"


def copy_tokenizers(diffusers, folder):
    """The diffusers folder's tokenizer folders, copied into `folder`."""
    for name in TOKENIZERS:
        shutil.copytree(os.path.join(diffusers, name), os.path.join(folder, name))


def sd3_case(root):
    """(pipeline, diffusers folder, single file with tokenizers beside it)."""
    pipeline = build_pipeline("sd3")
    diffusers = sd3_fixtures.save_reference_folder(pipeline, root / "diffusers")
    os.makedirs(root / "stability")
    path = write_all_in_one(pipeline, root / "stability" / ALL_IN_ONE)
    copy_tokenizers(diffusers, root / "stability")
    return pipeline, diffusers, path


def sd35_case(root):
    """(pipeline, diffusers folder, Stability repository folder)."""
    pipeline = build_pipeline("sd35", identity_clip_l_projection=True)
    diffusers = sd3_fixtures.save_reference_folder(pipeline, root / "diffusers")
    folder = root / "stability"
    write_separate(pipeline, str(folder))
    copy_tokenizers(diffusers, folder)
    return pipeline, diffusers, str(folder)
