"""Parity of `MMDiT` + `load_mmdit` with diffusers' `SD3Transformer2DModel`."""

import doctest
import json

import keras
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from keras_diffusion.converters import diffusers_mmdit
from keras_diffusion.converters.diffusers_mmdit import load_mmdit, mmdit_kwargs
from keras_diffusion.converters.safetensors_reader import TensorSource
from keras_diffusion.models.stable_diffusion_3 import mmdit as mmdit_module
from keras_diffusion.models.stable_diffusion_3 import mmdit_blocks
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT

SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=24,
    out_channels=16,
    pos_embed_max_size=16,
)
SD35_MEDIUM = dict(SD3, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1))
# Dual attention on the context-pre-only last block as well.
SD35_LAST_DUAL = dict(SD35_MEDIUM, dual_attention_layers=(0, 2))
CONFIGS = {"sd3": SD3, "sd35_medium": SD35_MEDIUM, "sd35_last_dual": SD35_LAST_DUAL}

# (config, latent size in latent pixels (h, w)): square, wide (up to the full
# width of the 16x16-patch position table) and tall.
CASES = [
    ("sd3", (8, 8)),
    ("sd3", (12, 32)),
    ("sd35_medium", (8, 8)),
    ("sd35_medium", (12, 8)),
    ("sd35_last_dual", (8, 12)),
]
TIMESTEPS = np.array([997.5, 300.0], "float32")
CONTEXT_LENGTH = 7


def _randomise(model, seed):
    """Re-draw every parameter (diffusers zero-inits the AdaLN-Zero gates)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim >= 2:
                fan_in = int(np.prod(param.shape[1:]))
                param.copy_(noise * (0.6 / fan_in**0.5))
            elif name.endswith("bias"):
                param.copy_(noise * 0.05)
            else:  # RMS q/k norm weights
                param.copy_(1.0 + 0.2 * noise)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(name)` -> (torch reference, float32 MMDiT, checkpoint dir)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            reference = SD3Transformer2DModel(**CONFIGS[name]).eval()
            _randomise(reference, seed=len(name))
            path = tmp_path_factory.mktemp(name)
            reference.save_pretrained(path, safe_serialization=True)
            cache[name] = reference, _load(path), path
        return cache[name]

    return get


def _load(path, dtype=None):
    with open(path / "config.json") as f:
        kwargs = mmdit_kwargs(json.load(f))
    model = MMDiT(**kwargs, dtype=dtype)
    weights = path / "diffusion_pytorch_model.safetensors"
    load_mmdit(model, TensorSource.from_files(weights))
    return model


def _inputs(height, width, seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, height, width, 16)).astype("float32")
    context = rng.standard_normal((2, CONTEXT_LENGTH, 32)).astype("float32")
    pooled = rng.standard_normal((2, 24)).astype("float32")
    return latents, context, pooled, TIMESTEPS


def _reference(reference, latents, context, pooled, timestep):
    with torch.no_grad():
        out = reference(
            hidden_states=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(timestep),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _eager(model, *inputs):
    return np.asarray(keras.ops.convert_to_numpy(model(*inputs)), "float32")


_JITTED = {}


def _jax_jit(model, *inputs, **options):
    """`model(*inputs, **options)` under `jax.jit`, one compiled function per
    model and options (Python values)."""
    import jax

    key = (id(model), tuple(sorted(options.items())))
    if key not in _JITTED:

        @jax.jit
        def run(trainable, non_trainable, *args):
            return model.stateless_call(trainable, non_trainable, *args, **options)[0]

        _JITTED[key] = model, run  # the model is kept alive with its id
    run = _JITTED[key][1]
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    return np.asarray(run(trainable, non_trainable, *inputs), "float32")


def _ours(model, *inputs, **options):
    # Eager JAX compiles every op separately; one jit per model is faster.
    if keras.backend.backend() == "jax":
        return _jax_jit(model, *inputs, **options)
    return np.asarray(keras.ops.convert_to_numpy(model(*inputs, **options)), "float32")


@pytest.mark.parametrize(
    "name, size", CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in CASES]
)
def test_matches_diffusers_float32(converted, name, size):
    reference, model, _ = converted(name)
    inputs = _inputs(*size)
    expected = _reference(reference, *inputs)
    actual = _ours(model, *inputs)
    assert actual.shape == inputs[0].shape
    # The reference output must be far from trivial for the check to bite.
    assert expected.std() > 0.2
    assert np.abs(expected[0] - expected[1]).max() > 0.1
    diff = np.abs(actual - expected).max()
    print(f"\n{keras.backend.backend()} {name} {size}: max abs diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["sd3", "sd35_medium"])
def test_identical_trailing_tokens_run_once_match_diffusers(converted, name):
    # A model without T5 pads its context with T5's length of zero tokens.
    # Passed once with `last_token_repeats`, they must give what diffusers
    # gives for all of them.
    reference, model, _ = converted(name)
    latents, context, pooled, timestep = _inputs(8, 8)
    zeros = 6
    context[:, CONTEXT_LENGTH - zeros :] = 0.0
    expected = _reference(reference, latents, context, pooled, timestep)
    collapsed = context[:, : CONTEXT_LENGTH - zeros + 1]
    actual = _ours(model, latents, collapsed, pooled, timestep, last_token_repeats=6)
    # Without the repeat count the result differs: the check bites.
    unweighted = _ours(model, latents, collapsed, pooled, timestep)
    assert np.abs(unweighted - expected).max() > 1e-2
    diff = np.abs(actual - expected).max()
    print(f"\n{keras.backend.backend()} {name}: max abs diff {diff:.2e}")
    assert diff <= 1e-4


# Tolerances on the max abs diff to the float32 output, whose max abs value is
# about 2 (measured diffs: bfloat16 ~1e-2, float16 ~1.5e-3): bfloat16 keeps 8
# mantissa bits, float16 11.
@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.06), ("float16", 0.01)])
def test_half_precision_close_to_float32(converted, dtype, tolerance):
    if keras.backend.backend() == "jax" and dtype == "float16":
        # jax.jit of float16 attention fails on CPU ("precision F16_F16_F32 is
        # not supported by dot_general on CPU"; fine on GPU), and eager JAX
        # takes about a minute here; float16 is checked under TF and torch.
        pytest.skip("float16 attention cannot be jitted by JAX on CPU")
    _, model, path = converted("sd35_medium")
    half = _load(path, dtype=dtype)
    inputs = _inputs(12, 8, seed=1)
    expected = _ours(model, *inputs)
    actual = _ours(half, *inputs)
    assert np.isfinite(actual).all()
    diff = np.abs(actual - expected).max()
    scale = np.abs(expected).max()
    print(
        f"\n{keras.backend.backend()} {dtype}: max abs diff {diff:.2e} of {scale:.2f}"
    )
    assert diff <= tolerance
    if dtype == "bfloat16":
        # The timestep reaches the sinusoidal embedding in float32: 997.5 would
        # round to 996 in bfloat16, making these two outputs identical.
        latents, context, pooled, _ = inputs
        rounded = np.array([996.0, 300.0], "float32")
        other = _ours(half, latents, context, pooled, rounded)
        assert np.abs(other[0] - actual[0]).max() > 1e-2
        np.testing.assert_array_equal(other[1], actual[1])


def test_dynamic_shape_graph_matches_eager(converted):
    """No host syncs or Python shape logic: a TF graph with unknown shapes.

    Under JAX every call in this file but the docstring examples already runs
    in `jax.jit`; torch has no graph mode to check.
    """
    if keras.backend.backend() != "tensorflow":
        pytest.skip("checked on tensorflow; JAX parity runs under jax.jit")
    import tensorflow as tf

    _, model, _ = converted("sd35_last_dual")
    inputs = _inputs(8, 12)
    expected = _eager(model, *inputs)
    run = tf.function(
        model.__call__,
        input_signature=[
            tf.TensorSpec((None, None, None, 16)),
            tf.TensorSpec((None, None, 32)),
            tf.TensorSpec((None, 24)),
            tf.TensorSpec((None,)),
        ],
    )
    np.testing.assert_allclose(run(*inputs).numpy(), expected, atol=1e-5)
    # jit_compile=True (XLA) with the same unknown shapes.
    run = tf.function(
        run.python_function, input_signature=run.input_signature, jit_compile=True
    )
    np.testing.assert_allclose(run(*inputs).numpy(), expected, atol=1e-5)


def _state(path):
    source = TensorSource.from_files(path / "diffusion_pytorch_model.safetensors")
    return {k: source.get(k) for k in source.keys()}


def _fresh(path):
    with open(path / "config.json") as f:
        return MMDiT(**mmdit_kwargs(json.load(f)))


def test_converter_fails_loudly(converted):
    _, _, path = converted("sd35_medium")
    state = _state(path)
    name = "transformer_blocks.0.attn.to_k.weight"
    wrong = dict(state, **{name: state[name][:, :-1]})
    with pytest.raises(ValueError, match=name):
        load_mmdit(_fresh(path), TensorSource.from_dict(wrong))
    name = "pos_embed.pos_embed"
    wrong = dict(state, **{name: state[name][:, :-1]})
    with pytest.raises(ValueError, match=name):
        load_mmdit(_fresh(path), TensorSource.from_dict(wrong))
    name = "transformer_blocks.1.ff.net.2.bias"
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(KeyError, match=name):
        load_mmdit(_fresh(path), TensorSource.from_dict(missing))
    extra = dict(state, **{"transformer_blocks.9.attn.to_q.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="transformer_blocks.9.attn.to_q.weight"):
        load_mmdit(_fresh(path), TensorSource.from_dict(extra))


def test_get_config_round_trip():
    model = MMDiT(
        hidden_dim=32,
        num_layers=3,
        num_heads=4,
        position_size=16,
        context_dim=32,
        pooled_dim=24,
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
        name="mmdit",
        dtype="bfloat16",
    )
    config = model.get_config()
    assert MMDiT.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(model)
    )
    assert isinstance(restored, MMDiT)
    assert restored.get_config() == config
    assert keras.saving.get_registered_name(MMDiT) == "keras_diffusion>MMDiT"
    for layer in (model.blocks[0], model.blocks[0].x_mlp, model.output_modulation):
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config
        name = keras.saving.get_registered_name(type(layer))
        assert name == f"keras_diffusion>{type(layer).__name__}"


def _shapes_only(build):
    """Run `build()` with Keras variables created but never initialised."""
    from keras.src.backend.common import global_state

    with keras.StatelessScope(initialize_variables=False):
        model = build()
    # Drop our deferred variables so that no later scope initialises them.
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    ours = {id(v) for v in model.weights}
    global_state.set_global_attribute(
        "uninitialized_variables", [v for v in pending if id(v) not in ours]
    )
    return model


@pytest.mark.parametrize(
    "extra", [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}]
)
def test_parameter_count_matches_diffusers_at_full_width(extra):
    config = dict(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
        sample_size=128,
        **extra,
    )
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**config)
    expected = sum(p.numel() for p in reference.parameters())
    buffer = sum(b.numel() for b in reference.buffers())

    def build():
        model = MMDiT(**mmdit_kwargs(config))
        model.build()
        return model

    model = _shapes_only(build)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert count == expected
    assert sum(int(np.prod(v.shape)) for v in model.non_trainable_weights) == buffer


def test_docstring_examples_run():
    if keras.backend.backend() == "jax":
        # Eager JAX compiles each op of each example (~40 s); the examples are
        # backend-neutral and run under TensorFlow and torch.
        pytest.skip("docstring examples are run under tensorflow and torch")
    for module in (mmdit_module, mmdit_blocks, diffusers_mmdit):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
