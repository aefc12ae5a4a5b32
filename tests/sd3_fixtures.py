"""Tiny random-weight SD3 reference models, built with diffusers/transformers.

`build_reference_pipeline(kind)` returns a diffusers
`StableDiffusion3Img2ImgPipeline` whose components are tiny, randomly
initialised (every parameter re-randomised, so no zero-init hides a bug), and
whose tokenizers use the real 49,408-token CLIP vocabulary built offline from
open_clip's merges file. `save_reference_folder` writes it with
`save_pretrained`, giving the diffusers layout our loader reads.

`build_reference_pipeline(kind, with_t5=True)` adds a tiny random T5 v1.1
encoder (`text_encoder_3`) and a T5 tokenizer (`tokenizer_3`) built from a
small SentencePiece unigram model trained offline on the prompt corpus.

Examples:

>>> import os, tempfile
>>> pipeline = build_reference_pipeline("sd35", with_t5=True)
>>> pipeline.text_encoder_3.config.d_model
96
>>> folder = save_reference_folder(pipeline, tempfile.mkdtemp())
>>> sorted(os.listdir(os.path.join(folder, "tokenizer_3")))[-1]
'tokenizer_config.json'
"""

import atexit
import functools
import gzip
import json
import os
import shutil
import site
import tempfile

import numpy as np

TINY_SIZE = 32  # pixels; 4x4 latents with a 4-block VAE


def _bytes_to_unicode():
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes]))


def _open_clip_merges_path():
    for root in site.getsitepackages():
        path = os.path.join(root, "open_clip", "bpe_simple_vocab_16e6.txt.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError("open_clip_torch is not installed (pip install --no-deps).")


@functools.lru_cache(maxsize=1)
def real_clip_vocabulary():
    """(vocab dict, merges list) of OpenAI CLIP, from open_clip's merges file."""
    with gzip.open(_open_clip_merges_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder):
    """Write vocab.json and merges.txt; each file appears whole (written to a
    temporary name, then renamed), as xdist workers share the folder and one
    may read while another writes."""
    vocab, merges = real_clip_vocabulary()
    os.makedirs(folder, exist_ok=True)
    contents = {
        "vocab.json": json.dumps(vocab),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }
    for name, text in contents.items():
        path = os.path.join(folder, name)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    return folder


def _randomise(module, seed, scale=0.08):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and "weight" in name:
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                fan_in = param.shape[1] if param.ndim > 1 else 1
                if param.ndim == 4:
                    fan_in = param.shape[1] * param.shape[2] * param.shape[3]
                std = scale if param.ndim == 1 else min(scale, 1.0 / np.sqrt(fan_in))
                values = std * torch.randn(param.shape, generator=generator)
            param.copy_(values)
    module.eval()
    return module


TRANSFORMER_CONFIGS = {
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
}


T5_VOCABULARY_SIZE = 400  # SentencePiece pieces; the tokenizer adds 100 sentinels
T5_MODEL_VOCABULARY_SIZE = 512  # padded beyond the tokenizer, as T5-XXL's 32128


def train_t5_sentencepiece(folder=None):
    """Train a tiny T5-layout SentencePiece unigram model; return its folder.

    T5's id layout: `<pad>` 0, `</s>` 1, `<unk>` 2, no BOS. The folder holds
    `spiece.model`, from which `transformers.T5TokenizerFast` loads.
    """
    import sentencepiece
    from prompt_corpus import prompt_corpus

    if folder is None:
        folder = tempfile.mkdtemp(prefix="kd-t5-spm-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([p for p in prompt_corpus() if p.strip()]),
        model_prefix=os.path.join(folder, "spiece"),
        vocab_size=T5_VOCABULARY_SIZE,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return folder


def build_t5_reference(seed=5, spm_dir=None):
    """`(T5EncoderModel, T5TokenizerFast)`: tiny, random, gated-GELU T5 v1.1."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    config = T5Config(
        vocab_size=T5_MODEL_VOCABULARY_SIZE,
        d_model=96,  # the MMDiT's joint_attention_dim
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    encoder = _randomise(T5EncoderModel(config), seed)
    tokenizer = T5TokenizerFast.from_pretrained(spm_dir or train_t5_sentencepiece())
    return encoder, tokenizer


def build_reference_pipeline(kind="sd3", tokenizer_dir=None, with_t5=False):
    """A tiny diffusers SD3 img2img pipeline, in eval mode, float32.

    Args:
        kind: "sd3" (no qk-norm, 2 blocks) or "sd35" (RMS qk-norm, a dual
            attention block, 3 blocks).
        tokenizer_dir: folder of the CLIP `vocab.json` / `merges.txt`
            (written to a temp folder when None).
        with_t5: add a tiny T5 encoder and tokenizer (`text_encoder_3`,
            `tokenizer_3`); without it the pipeline's T5 context is zeros.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_SIZE // 8,
        patch_size=2,
        in_channels=16,
        num_layers=2 if kind == "sd3" else 3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=40,
        out_channels=16,
        pos_embed_max_size=16,
        **TRANSFORMER_CONFIGS[kind],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )

    def clip(hidden, projection, act, seed):
        config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=projection,
            hidden_act=act,
            max_position_embeddings=77,
            eos_token_id=49407,
            bos_token_id=49406,
            pad_token_id=1,
        )
        return _randomise(CLIPTextModelWithProjection(config), seed)

    text_encoder = clip(32, 16, "quick_gelu", 1)
    text_encoder_2 = clip(48, 24, "gelu", 2)
    _randomise(transformer, 3)
    _randomise(vae, 4)
    folder = tokenizer_dir or write_clip_tokenizer_files(
        os.path.join(os.environ.get("TMPDIR", "/tmp"), "kd-clip-vocab")
    )
    vocab_file = os.path.join(folder, "vocab.json")
    merges_file = os.path.join(folder, "merges.txt")
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(
        vocab_file, merges_file, pad_token="!", model_max_length=77
    )
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        text_encoder_3, tokenizer_3 = build_t5_reference()
    return StableDiffusion3Img2ImgPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def save_reference_folder(pipeline, path):
    pipeline.save_pretrained(path, safe_serialization=True)
    return str(path)


def run_reference(
    pipeline,
    images_uint8,
    prompts,
    negative_prompts,
    num_steps,
    guidance_scale,
    strength,
    posterior_noise,
    noise,
):
    """Run the diffusers pipeline with injected noise; return uint8 NHWC."""
    import torch
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.stable_diffusion_3 import (
        pipeline_stable_diffusion_3_img2img as img2img_module,
    )

    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    queue = {"vae": to_torch(posterior_noise), "pipe": to_torch(noise)}

    def fake_randn(which):
        def randn(shape, *args, **kwargs):
            value = queue[which]
            assert tuple(value.shape) == tuple(shape), (value.shape, shape)
            return value.clone()

        return randn

    original = (vae_module.randn_tensor, img2img_module.randn_tensor)
    vae_module.randn_tensor = fake_randn("vae")
    img2img_module.randn_tensor = fake_randn("pipe")
    try:
        with torch.no_grad():
            out = pipeline(
                prompt=list(prompts),
                negative_prompt=list(negative_prompts),
                image=images_uint8.astype(np.float32) / 255.0,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                strength=strength,
                height=images_uint8.shape[1],
                width=images_uint8.shape[2],
                output_type="np",
            ).images
    finally:
        vae_module.randn_tensor, img2img_module.randn_tensor = original
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)
