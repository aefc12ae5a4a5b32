"""`keras.distribution` support: data and model parallelism on jax.

The multi-device checks run in a jax subprocess on CPU with 4 simulated
devices (`--xla_force_host_platform_device_count`), whatever backend the
suite runs on, so the rest of the suite keeps its single device. This file
is also the workers' script: `python tests/test_distribution.py generate`
(or `fit`).
"""

import doctest
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from keras_diffusion.models.stable_diffusion_3 import distribution
from keras_diffusion.presets import catalogue
from keras_diffusion.utils import backend
from keras_diffusion.utils.weight_loading import loading_weights

DEVICES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLING = dict(num_steps=3, strength=0.8, guidance_scale=5.0, height=32, width=32)


def _demo_config():
    with open(os.path.join(ROOT, "presets", "sd3_tiny_demo", "config.json")) as f:
        return json.load(f)["config"]


def _demo_latent_shape(height, width):
    """The demo preset's latent shape at `height` x `width`, from its config."""
    vae = _demo_config()["vae"]
    factor = 2 ** (len(vae["block_channels"]) - 1)
    return (height // factor, width // factor, vae["latent_channels"])


def _inputs(batch=3, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square", "a green star", "a cat"][:batch]
    shape = (batch, *_demo_latent_shape(32, 32))
    noise = {
        "posterior_noise": rng.standard_normal(shape).astype(np.float32),
        "noise": rng.standard_normal(shape).astype(np.float32),
    }
    return {"images": images, "prompts": prompts}, noise


def _run_worker(scenario, timeout=600):
    flags = [
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={DEVICES}",
        "--xla_backend_optimization_level=0",  # compiles faster
    ]
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(flags).strip(),
        PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), scenario],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise AssertionError(f"The jax worker failed:\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1])


# -------------------------------------------------------------- jax worker
def _layout_mismatches(variables, layouts):
    """Variables whose sharding is not what `layouts` (a LayoutMap) says."""
    wrong = []
    for v in variables:
        layout = layouts[v.path]
        expected = tuple(layout.axes) if layout is not None else (None,) * v.ndim
        spec = tuple(v.value.sharding.spec)
        actual = spec + (None,) * (v.ndim - len(spec))
        if actual != expected:
            wrong.append(f"{v.path}: {actual} != {expected}")
    return wrong


def _device_share(variables, layouts):
    """Bytes of the sharded variables on device 0 / their total bytes."""
    sharded = [v for v in variables if layouts[v.path] is not None]
    on_one = sum(v.value.addressable_shards[0].data.nbytes for v in sharded)
    return on_one / sum(v.value.nbytes for v in sharded)


def _bytes_on_one_device(variables):
    return sum(v.value.addressable_shards[0].data.nbytes for v in variables)


def worker_generate():
    devices = keras.distribution.list_devices()
    assert len(devices) == DEVICES, devices
    inputs, noise = _inputs()
    task = kd.models.ImageToImage.from_preset("sd3_tiny_demo")
    reference = task.generate(inputs, **SAMPLING, **noise)
    seeded = task.generate(inputs, **SAMPLING, seed=7)
    out = {}

    def diff(images, target=reference):
        return int(np.abs(images.astype(int) - target.astype(int)).max())

    # Data parallel: the same task, its variables laid out on first use; a
    # batch of 3 is padded to 4 over the 4-device "batch" axis.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    out["dp_diff"] = diff(task.generate(inputs, **SAMPLING, **noise))
    out["dp_seed_diff"] = diff(task.generate(inputs, **SAMPLING, seed=7), seeded)
    padded, padded_noise = _inputs(batch=4)
    latents = task.encode_image(
        task.resize_images(padded["images"] / 127.5 - 1.0, 32, 32),
        padded_noise["posterior_noise"],
    )
    out["dp_latents_spec"] = [str(a) for a in latents.sharding.spec]
    out["dp_variable_specs"] = sorted(
        {str(tuple(v.value.sharding.spec)) for v in task.backbone.variables}
    )

    # Model parallel on a combined 2x2 mesh: loaded under the distribution.
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
    layouts = kd.models.StableDiffusion3Backbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    )
    task_2x2 = kd.models.ImageToImage.from_preset("sd3_tiny_demo")
    out["mp_wrong"] = _layout_mismatches(task_2x2.backbone.variables, layouts)
    out["mp_diff"] = diff(task_2x2.generate(inputs, **SAMPLING, **noise))

    # Per-device share and bytes, against the memory table's function.
    variables = task_2x2.backbone.variables
    out["mp_sharded"] = sum(layouts[v.path] is not None for v in variables)
    out["mp_share"] = _device_share(variables, layouts)
    out["mp_bytes"] = _bytes_on_one_device(variables)
    config = task_2x2.backbone.get_config()
    expected = distribution.parameter_bytes_per_device(config, (2, 2), dtype="float32")
    out["mp_expected_bytes"] = expected["total"]

    # T5 (not in the demo): a tiny encoder named as in the backbone, loaded
    # the way presets are (values assigned after a value-less build).
    t5_config = dict(
        vocabulary_size=64, hidden_dim=32, num_layers=2, num_heads=4,
        key_value_dim=8, intermediate_dim=64,
    )  # fmt: skip
    with loading_weights() as build:
        t5 = build(lambda: kd.models.T5Encoder(**t5_config, name="t5"))
        t5.build((None, 8))
        for v in t5.variables:
            v.assign(np.full(v.shape, 0.5, v.dtype))
    out["t5_wrong"] = _layout_mismatches(t5.variables, layouts)
    out["t5_sharded"] = sum(layouts[v.path] is not None for v in t5.variables)
    out["t5_share"] = _device_share(t5.variables, layouts)
    out["t5_bytes"] = _bytes_on_one_device(t5.variables)
    config["t5"] = t5_config
    expected = distribution.parameter_bytes_per_device(config, (2, 2), dtype="float32")
    out["t5_expected_bytes"] = expected["t5"]
    return out


def worker_fit():
    devices = keras.distribution.list_devices()
    rng = np.random.default_rng(0)
    data = {
        "images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "prompts": ["a red circle", "a blue square", "a cat", "a dog"] * 2,
    }
    # The frozen encoders run once; the train step is the MMDiT's.
    cache = kd.models.ImageToImage.from_preset("sd3_tiny_demo").precompute(data)

    def fit(distribution=None, initial=None):
        # Keras' rule: create (and compile) the model under the distribution.
        keras.distribution.set_distribution(distribution)
        task = kd.models.ImageToImage.from_preset(
            "sd3_tiny_demo", seed=3, prompt_dropout=0.0
        )
        if initial is not None:
            initial.update({v.path: np.asarray(v.value) for v in task.variables})
        task.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
        task.fit(cache, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return task.backbone.mmdit.variables

    def diff(variables, target):
        return max(
            float(np.abs(np.asarray(v.value) - target[v.path]).max()) for v in variables
        )

    initial = {}
    trained = fit(initial=initial)
    reference = {v.path: np.asarray(v.value) for v in trained}
    out = {"fit_change": diff(trained, initial)}
    data_parallel = keras.distribution.DataParallel(devices=devices)
    out["dp_fit_diff"] = diff(fit(data_parallel), reference)
    mesh = keras.distribution.DeviceMesh((1, DEVICES), ("batch", "model"), devices)
    layouts = kd.models.StableDiffusion3Backbone.get_layout_map(mesh)
    variables = fit(
        keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    )
    out["mp_fit_diff"] = diff(variables, reference)
    out["mp_fit_wrong"] = _layout_mismatches(variables, layouts)
    out["mp_fit_share"] = _device_share(variables, layouts)
    return out


# ------------------------------------------------------------------- tests
def test_generate_on_jax_devices():
    r = _run_worker("generate")
    # Data parallel equals one device, injected noise or seeded.
    assert r["dp_diff"] <= 1
    assert r["dp_seed_diff"] <= 1
    # The batch really is split; the weights are replicated.
    assert r["dp_latents_spec"][0] == "batch"
    assert all("'" not in spec for spec in r["dp_variable_specs"])
    # Model parallel on a 2x2 (data and model) mesh equals one device.
    assert r["mp_diff"] <= 1
    # Every variable is laid out as the map says.
    assert r["mp_wrong"] == [] and r["t5_wrong"] == []
    # CLIP-L and CLIP-G: the token table, and 6 per layer (q/k/v and fc1
    # kernels and biases, attention output and fc2 kernels), 2 layers each.
    # MMDiT: the position table; 16 per full block (q/k/v, modulation and
    # first MLP kernels and biases, attention output and second MLP kernels,
    # both streams), in every block but the last, and 12 in the pre-only last
    # block (its text stream has no attention output or MLP). T5: the token
    # table and 4 kernels per layer.
    blocks = _demo_config()["mmdit"]["num_layers"]
    assert r["mp_sharded"] == 2 * (1 + 2 * 6) + 1 + (blocks - 1) * 16 + 12
    assert r["t5_sharded"] == 1 + 2 * 4
    # On the 2x2 mesh a device holds half of what the map shards.
    assert r["mp_share"] == pytest.approx(1 / 2)
    assert r["t5_share"] == pytest.approx(1 / 2)
    # The memory table's function matches the real per-device bytes.
    assert r["mp_bytes"] == r["mp_expected_bytes"]
    assert r["t5_bytes"] == r["t5_expected_bytes"]


def test_fit_on_jax_devices():
    r = _run_worker("fit")
    assert r["fit_change"] > 1e-3  # the steps did train
    # Two SGD steps with the batch split 4 ways, or the kernels split 4
    # ways, give the single-device weights up to float rounding.
    assert r["dp_fit_diff"] < 1e-5
    assert r["mp_fit_diff"] < 1e-5
    # Training keeps the layouts; a device holds a quarter of the split ones.
    assert r["mp_fit_wrong"] == []
    assert r["mp_fit_share"] == pytest.approx(1 / DEVICES)


# ------------------------------------------------------- in-process checks
@pytest.mark.parametrize("module", [distribution, backend])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_parameter_bytes_match_the_catalogue_counts():
    for name in catalogue.names():
        entry = catalogue.get(name)
        if "config" not in entry:
            continue
        for mesh in ((1, 8), (2, 4)):
            split = distribution.parameter_bytes_per_device(entry["config"], mesh)
            assert split["parameters"] == entry["parameters"]["total"], name
            fraction, whole = split["sharded_fraction"], split["unsharded"]
            assert fraction > 0.9, (name, mesh)
            expected = whole * (fraction / mesh[1] + 1 - fraction)
            assert split["total"] == pytest.approx(expected, rel=1e-9)


def test_layout_map_needs_a_model_axis():
    mesh = keras.distribution.DeviceMesh((2,), ("batch",), ["cpu:0", "cpu:1"])
    with pytest.raises(ValueError, match="model"):
        kd.models.StableDiffusion3Backbone.get_layout_map(mesh)


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="jax honours the distribution"
)
def test_other_backends_warn_and_run_on_one_device():
    task = kd.models.ImageToImage.from_preset("sd3_tiny_demo")
    inputs, noise = _inputs(batch=1)
    expected = task.generate(inputs, **SAMPLING, **noise)
    data_parallel = keras.distribution.DataParallel(devices=["cpu:0"])
    with data_parallel.scope():
        with pytest.warns(UserWarning, match="only on the jax backend"):
            images = task.generate(inputs, **SAMPLING, **noise)
    np.testing.assert_array_equal(images, expected)


if __name__ == "__main__":
    print(json.dumps(globals()[f"worker_{sys.argv[1]}"]()))
