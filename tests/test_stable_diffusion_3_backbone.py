"""`StableDiffusion3Backbone` parity with diffusers, component by component.

Tiny random-weight diffusers SD3 / SD3.5 img2img pipelines (`sd3_fixtures`,
with and without a T5 encoder) are saved with `save_pretrained` and loaded
through `StableDiffusion3Backbone.from_preset(folder)` and
`StableDiffusion3Preprocessor.from_preset(folder)`. Then, in float32:

- the text context and pooled vector equal `pipeline.encode_prompt(...)`
  (max abs diff <= 1e-5), for long, empty and "!!!" prompts;
- the VAE posterior (mean, log-variance) and `decode` equal diffusers' vae
  (<= 1e-4);
- one `guided_velocity` equals diffusers' transformer plus the CFG formula
  (<= 1e-4);

and bfloat16 / float16 loads run the text encoders and the MMDiT without
NaN or inf, within a stated relative tolerance of float32. `collapse_context`
shortens only a zero T5 tail.
"""

import json

import keras
import numpy as np
import pytest
import sd3_fixtures

from keras_diffusion.models import (
    Backbone,
    StableDiffusion3Backbone,
    StableDiffusion3Preprocessor,
)
from keras_diffusion.utils.backend import compile_function
from keras_diffusion.utils.weight_loading import loading_weights

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

# name -> (transformer kind, with T5). The CLIP encoders and the VAE of the
# fixtures are the same (same seeds) in every kind; the MMDiTs differ.
KINDS = {"sd3": ("sd3", False), "sd35_t5": ("sd35", True)}
TEXT_TOLERANCE = 1e-5
# The T5 tokens are held to TEXT_TOLERANCE times their magnitude (up to 3.5
# here, where float32 itself is the limit): transformers' own float32 T5 is
# 9.2e-6 away from its float64 result; ours is 4.4e-6 (jax) to 9.2e-6
# (torch) away from float64, and 1.4e-6 (torch) to 1.1e-5 (tensorflow) away
# from float32 diffusers. The CLIP tokens and pooled vectors: <= 4.2e-7.
MODEL_TOLERANCE = 1e-4
# Half precision: max abs diff to float32 diffusers, relative to the largest
# reference magnitude. Measured on these tiny models (all backends): bfloat16
# <= 0.026, float16 <= 0.004.
HALF_TOLERANCE = {"bfloat16": 0.06, "float16": 0.015}

LONG = ", ".join(["a very detailed photograph of a red fox in the snow"] * 12)
PROMPT_CASES = [
    # (prompts, negative prompts), batch 2 each
    (["a red circle on a blue background", "!!!"], ["", "blurry!!!"]),
    ([LONG, "a photo of a cat, 4k"], [LONG + " ugly" * 200, "!!! !!!"]),
    (["", "!!!!!!!!!!!!!!!!!!!!"], ["caf\u00e9 na\u00efve", "   "]),
]


class Reference:
    """A diffusers pipeline, its saved folder and our loaded counterparts."""

    def __init__(self, name, pipeline, folder, backbone, preprocessor):
        self.name = name
        self.pipeline = pipeline
        self.folder = folder
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.functions = Functions(backbone)


class Functions:
    """The backbone's step methods, compiled once (eager jax is slow)."""

    def __init__(self, backbone, compiled=True):
        self.backbone = backbone
        self.compiled = compiled
        self._cache = {}

    def _get(self, key, fn):
        if not self.compiled:
            return fn
        if key not in self._cache:
            self._cache[key] = compile_function(fn, self.backbone.variables)
        return self._cache[key]

    def encode_text(self, ids):
        names = ["clip_l", "clip_g"] + (["t5"] if "t5" in ids else [])
        fn = self._get(("text", len(names)), self.backbone.encode_text)
        context, pooled = fn(*[keras.ops.convert_to_tensor(ids[n]) for n in names])
        return _numpy(context), _numpy(pooled)

    def guided_velocity(self, latents, context, pooled, sigma, guidance, cfg):
        def fn(x, c, p, s, g):
            return self.backbone.guided_velocity(x, c, p, s, g, cfg)

        args = [latents, context, pooled, np.float32(sigma), np.float32(guidance)]
        fn = self._get(("velocity", cfg), fn)
        return _numpy(fn(*[keras.ops.convert_to_tensor(a) for a in args]))

    def encode_image(self, images):
        fn = self._get(("image",), self.backbone.encode_image)
        mean, log_variance = fn(keras.ops.convert_to_tensor(images))
        return _numpy(mean), _numpy(log_variance)

    def decode(self, latents):
        fn = self._get(("decode",), self.backbone.decode)
        return _numpy(fn(keras.ops.convert_to_tensor(latents)))


def _numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module", autouse=True)
def _quiet_diffusers():
    # diffusers logs every CLIP / T5 truncation of the long prompts.
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(verbosity)


@pytest.fixture(scope="module", params=list(KINDS))
def reference(request, tmp_path_factory):
    kind, with_t5 = KINDS[request.param]
    pipeline = sd3_fixtures.build_reference_pipeline(kind, with_t5=with_t5)
    folder = str(tmp_path_factory.mktemp(request.param) / "diffusers")
    sd3_fixtures.save_reference_folder(pipeline, folder)
    backbone = StableDiffusion3Backbone.from_preset(folder)
    preprocessor = StableDiffusion3Preprocessor.from_preset(folder)
    return Reference(request.param, pipeline, folder, backbone, preprocessor)


def diffusers_text(pipeline, prompts, negative_prompts):
    """`(prompt, negative, pooled, negative pooled)` from diffusers, numpy."""
    with torch.no_grad():
        outputs = pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompts,
            do_classifier_free_guidance=True,
            max_sequence_length=256,
        )
    return [o.numpy() for o in outputs]


def diffusers_velocity(pipeline, latents, context, pooled, sigma, guidance):
    """diffusers' img2img step: transformer on [x; x], then CFG."""
    x = _nchw(latents)
    batch = 2 * x.shape[0]
    with torch.no_grad():
        out = pipeline.transformer(
            hidden_states=torch.cat([x, x]),
            timestep=torch.full((batch,), sigma * 1000.0),
            encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(pooled),
            return_dict=False,
        )[0]
    negative, positive = out.chunk(2)
    return _nhwc(negative + guidance * (positive - negative))


def _cfg_inputs(reference):
    prompts, negatives = PROMPT_CASES[0]
    embeds, neg_embeds, pooled, neg_pooled = diffusers_text(
        reference.pipeline, prompts, negatives
    )
    context = np.concatenate([neg_embeds, embeds])
    pooled = np.concatenate([neg_pooled, pooled])
    latents = np.random.default_rng(3).standard_normal((2, 4, 6, 16))
    return latents.astype("float32"), context, pooled


# ------------------------------------------------------------------- text
@pytest.mark.parametrize("case", range(len(PROMPT_CASES)))
def test_text_matches_diffusers_encode_prompt(reference, case):
    prompts, negatives = PROMPT_CASES[case]
    expected = diffusers_text(reference.pipeline, prompts, negatives)
    assert expected[0].shape == (2, 77 + 256, 96)
    ids = reference.preprocessor.generate_preprocess
    context, pooled = reference.functions.encode_text(ids(prompts))
    neg_context, neg_pooled = reference.functions.encode_text(ids(negatives))
    ours = [context, neg_context, pooled, neg_pooled]
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled", "negative_pooled"]
    for name, got, want in zip(names, ours, expected):
        assert got.shape == want.shape, name
        diff = _max_diff(got[..., :77, :], want[..., :77, :])  # CLIP (or pooled)
        assert diff <= TEXT_TOLERANCE, f"{reference.name} {name}: max diff {diff}"
        if got.ndim == 3:  # the T5 tokens (zeros without T5)
            diff = _max_diff(got[:, 77:], want[:, 77:])
            tolerance = TEXT_TOLERANCE * max(1.0, np.abs(want[:, 77:]).max())
            assert diff <= tolerance, f"{reference.name} {name} T5: {diff}"
    if reference.backbone.t5 is None:
        np.testing.assert_array_equal(context[:, 77:], 0.0)
    else:
        assert "t5" in ids(prompts) and np.abs(context[:, 77:]).max() > 0.1


def test_t5_presence_follows_the_folder(reference):
    has_t5 = reference.pipeline.text_encoder_3 is not None
    assert (reference.backbone.t5 is not None) == has_t5
    assert (reference.preprocessor.t5_tokenizer is not None) == has_t5
    ids = reference.preprocessor.generate_preprocess(["a cat"])
    assert ids["clip_l"].shape == ids["clip_g"].shape == (1, 77)
    if has_t5:
        assert ids["t5"].shape == (1, 256)


# -------------------------------------------------------------------- VAE
def test_vae_matches_diffusers(reference):
    if reference.name != "sd3":
        pytest.skip("every fixture kind has the same VAE; sd3 checks it")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 48, 3)).astype("float32")
    vae = reference.pipeline.vae
    with torch.no_grad():
        posterior = vae.encode(_nchw(images)).latent_dist
    mean, log_variance = reference.functions.encode_image(images)
    assert mean.shape == log_variance.shape == (2, 4, 6, 16)
    assert _max_diff(mean, _nhwc(posterior.mean)) <= MODEL_TOLERANCE
    assert _max_diff(log_variance, _nhwc(posterior.logvar)) <= MODEL_TOLERANCE

    latents = rng.standard_normal((2, 4, 6, 16)).astype("float32")
    config = vae.config
    with torch.no_grad():
        z = _nchw(latents) / config.scaling_factor + config.shift_factor
        expected = _nhwc(vae.decode(z).sample)
    decoded = reference.functions.decode(latents)
    assert decoded.shape == (2, 32, 48, 3)
    assert _max_diff(decoded, expected) <= MODEL_TOLERANCE


# ------------------------------------------------------------------ MMDiT
@pytest.mark.parametrize("sigma, guidance", [(0.7, 4.5), (1.0, 1.0), (0.05, 7.0)])
def test_guided_velocity_matches_diffusers(reference, sigma, guidance):
    latents, context, pooled = _cfg_inputs(reference)
    expected = diffusers_velocity(
        reference.pipeline, latents, context, pooled, sigma, guidance
    )
    ours = reference.functions.guided_velocity(
        latents, context, pooled, sigma, guidance, cfg=True
    )
    diff = _max_diff(ours, expected)
    assert diff <= MODEL_TOLERANCE, f"{reference.name}: max diff {diff}"


# --------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_stay_close_to_float32(reference, dtype):
    backbone = StableDiffusion3Backbone.from_preset(reference.folder, dtype=dtype)
    assert backbone.compute_dtype == dtype
    assert backbone.mmdit.compute_dtype == dtype
    # jax cannot compile float16 attention on CPU (see below); eager runs.
    compiled = not (dtype == "float16" and _jax_on_cpu())
    functions = Functions(backbone, compiled=compiled)
    tolerance = HALF_TOLERANCE[dtype]

    prompts, negatives = PROMPT_CASES[1]
    embeds, neg_embeds, pooled, neg_pooled = diffusers_text(
        reference.pipeline, prompts, negatives
    )
    ids = reference.preprocessor.generate_preprocess(negatives + prompts)
    context, pooled_ours = functions.encode_text(ids)
    for got, want in [
        (context, np.concatenate([neg_embeds, embeds])),
        (pooled_ours, np.concatenate([neg_pooled, pooled])),
    ]:
        assert np.isfinite(got).all(), f"{dtype} text has NaN/inf"
        relative = _max_diff(got, want) / np.abs(want).max()
        assert relative <= tolerance, f"{reference.name} {dtype} text: {relative}"

    latents, context, pooled = _cfg_inputs(reference)
    expected = diffusers_velocity(
        reference.pipeline, latents, context, pooled, 0.7, 4.5
    )
    velocity = functions.guided_velocity(latents, context, pooled, 0.7, 4.5, cfg=True)
    assert np.isfinite(velocity).all(), f"{dtype} velocity has NaN/inf"
    relative = _max_diff(velocity, expected) / np.abs(expected).max()
    assert relative <= tolerance, f"{reference.name} {dtype} velocity: {relative}"


def _jax_on_cpu():
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


@pytest.mark.skipif(not _jax_on_cpu(), reason="jax on CPU only")
@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="known: jax 0.10's `jax.nn.dot_product_attention` asks for "
    "F16_F16_F32 precision, which XLA:CPU rejects at compile time, so a jitted "
    "float16 attention fails (eager falls back to Keras' own attention)",
)
def test_float16_attention_compiles_with_jax_on_cpu():
    q = np.ones((1, 4, 2, 8), "float16")
    attend = compile_function(keras.ops.dot_product_attention, [])
    attend(q, q, q)


# ----------------------------------------------------------------- config
def test_get_config_round_trips(reference):
    backbone = reference.backbone
    config = backbone.get_config()
    # Through JSON, as a preset stores it.
    config_json = json.loads(json.dumps(config))
    # Deferred initialisation (jax would compile every random initializer);
    # the weights are then copied, so the rebuilt model must compute the same.
    with loading_weights() as build:
        rebuilt = build(lambda: StableDiffusion3Backbone.from_config(config_json))
        rebuilt.set_weights(backbone.get_weights())
    assert json.dumps(rebuilt.get_config(), sort_keys=True) == json.dumps(
        config, sort_keys=True
    )
    assert [v.path for v in rebuilt.weights] == [v.path for v in backbone.weights]
    assert [tuple(v.shape) for v in rebuilt.weights] == [
        tuple(v.shape) for v in backbone.weights
    ]
    assert (rebuilt.t5 is None) == (backbone.t5 is None)
    assert rebuilt.height == rebuilt.width == sd3_fixtures.TINY_SIZE
    ids = reference.preprocessor.generate_preprocess(["a cat"])
    for got, want in zip(
        Functions(rebuilt).encode_text(ids), reference.functions.encode_text(ids)
    ):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_collapse_context_only_shortens_a_zero_t5_tail():
    backbone = Backbone.from_preset("sd3_tiny_demo")  # no T5, 2 zero tokens
    clip = backbone.clip_l.max_sequence_length
    ids = np.zeros((1, clip), "int32")
    context, _ = backbone.encode_text(ids, ids)
    assert context.shape[1] == clip + 2
    short, repeats = backbone.collapse_context(context, t5_ran=False)
    assert (short.shape[1], repeats) == (clip + 1, 2)
    np.testing.assert_array_equal(_numpy(short), _numpy(context)[:, : clip + 1])
    # T5's own tokens, or a context of another length, come back whole.
    for whole, t5_ran in ((context, True), (context[:, :clip], False)):
        out, repeats = backbone.collapse_context(whole, t5_ran=t5_ran)
        assert out is whole and repeats == 1
