"""Parity of the flow-matching Euler functions with diffusers' SD3 scheduler."""

import types

import keras
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline
from keras import ops

from keras_diffusion.samplers import flow_match

STRENGTHS = sorted({i / 10 for i in range(11)} | {0.1 * i for i in range(11)})


def _scheduler(shift=3.0):
    # SD3's scheduler config (scheduler/scheduler_config.json).
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _img2img_schedule(num_steps, strength):
    """diffusers' own img2img set-up: set_timesteps, then get_timesteps."""
    scheduler = _scheduler()
    scheduler.set_timesteps(num_steps)
    pipe = types.SimpleNamespace(scheduler=scheduler)
    ts, steps = StableDiffusion3Img2ImgPipeline.get_timesteps(
        pipe, num_steps, strength, "cpu"
    )
    return scheduler, ts, steps


def _velocity(x, t):
    # A fixed, timestep-dependent velocity field (numpy float32).
    c = np.linspace(-1.0, 1.0, x.shape[-1], dtype=np.float32)
    return (np.tanh(x) * np.float32(t / 1000.0) - 0.3 * x + c).astype(np.float32)


def test_four_step_schedule_has_twice_shifted_endpoint():
    np.testing.assert_allclose(
        flow_match.sigmas(4), [1.0, 0.857692, 0.602151, 0.008929, 0.0], atol=1e-6
    )


def test_sigmas_and_timesteps_match_diffusers():
    for shift in (3.0, 1.0, 2.5):
        for n in range(1, 61):
            scheduler = _scheduler(shift)
            scheduler.set_timesteps(n)
            ours = flow_match.sigmas(n, shift)
            assert ours.dtype == np.float32 and ours.shape == (n + 1,)
            np.testing.assert_array_equal(ours, scheduler.sigmas.numpy())
            ts = flow_match.timesteps(ours)
            assert ts.dtype == np.float32
            np.testing.assert_array_equal(ts, scheduler.timesteps.numpy())


def test_start_index_matches_diffusers_get_timesteps():
    assert flow_match.start_index(50, 0.8) == 10
    for n in range(1, 61):
        for strength in STRENGTHS:
            scheduler, ts, steps = _img2img_schedule(n, strength)
            i0 = flow_match.start_index(n, strength)
            assert isinstance(i0, int)
            assert i0 == scheduler.begin_index, (n, strength)
            assert n - i0 == steps == len(ts), (n, strength)


@pytest.mark.parametrize("num_steps,strength", [(4, 1.0), (10, 0.6), (28, 0.8)])
def test_euler_trajectory_matches_scheduler_step(num_steps, strength):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)

    scheduler, ts, _ = _img2img_schedule(num_steps, strength)
    latent_timestep = ts[:1].repeat(2)
    ref = scheduler.scale_noise(
        torch.from_numpy(x0), latent_timestep, torch.from_numpy(noise)
    )
    ref_start = ref.numpy().copy()
    for t in ts:
        v = torch.from_numpy(_velocity(ref.numpy(), float(t)))
        ref = scheduler.step(v, t, ref).prev_sample

    s = flow_match.sigmas(num_steps)
    t_ours = flow_match.timesteps(s)
    i0 = flow_match.start_index(num_steps, strength)
    np.testing.assert_array_equal(t_ours[i0:], ts.numpy())
    x = flow_match.add_noise(x0, noise, s[i0])
    np.testing.assert_allclose(ops.convert_to_numpy(x), ref_start, rtol=0, atol=1e-6)
    for i in range(i0, num_steps):
        v = _velocity(ops.convert_to_numpy(x), float(t_ours[i]))
        x = flow_match.euler_step(x, v, s[i], s[i + 1])
    x = ops.convert_to_numpy(x)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, ref.numpy(), rtol=0, atol=1e-6)


def test_add_noise_matches_scale_noise_per_batch():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 4, 6, 16)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 6, 16)).astype(np.float32)
    s = flow_match.sigmas(20)
    begin = [0, 7, 19]
    expected = []
    for b, i in enumerate(begin):
        scheduler = _scheduler()
        scheduler.set_timesteps(20)
        scheduler.set_begin_index(i)
        out = scheduler.scale_noise(
            torch.from_numpy(x0[b : b + 1]),
            scheduler.timesteps[i : i + 1],
            torch.from_numpy(noise[b : b + 1]),
        )
        expected.append(out.numpy())
    ours = flow_match.add_noise(x0, noise, ops.convert_to_tensor(s[begin]))
    np.testing.assert_allclose(
        ops.convert_to_numpy(ours), np.concatenate(expected), rtol=0, atol=1e-6
    )


def test_steps_keep_dtype_and_compute_in_float32():
    x = ops.ones((1, 2, 2, 16), dtype="bfloat16")
    v = ops.ones((1, 2, 2, 16), dtype="bfloat16")
    out = flow_match.euler_step(x, v, np.float32(1.0), np.float32(0.5))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(out, "float32")), 0.5)
    noisy = flow_match.add_noise(x, v * 3, 0.5)
    assert keras.backend.standardize_dtype(noisy.dtype) == "bfloat16"
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(noisy, "float32")), 2.0)


def _compiled(fn):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=False)
    return fn  # torch: eager


def test_steps_with_sigmas_as_traced_inputs():
    s = flow_match.sigmas(4)

    def loop(x0, noise, sig):
        x = flow_match.add_noise(x0, noise, sig[1])
        for i in range(1, 4):
            x = flow_match.euler_step(x, -x, sig[i], sig[i + 1])
        return x

    x0 = np.ones((1, 2, 2, 16), np.float32)
    out = _compiled(loop)(x0, np.zeros_like(x0), ops.convert_to_tensor(s))
    expected = (1 - s[1]) * np.prod(1 + (s[1:-1] - s[2:]))
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected + 0 * x0, rtol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: flow_match.start_index(0, 0.5), "num_steps"),
        (lambda: flow_match.start_index(2.5, 0.5), "num_steps"),
        (lambda: flow_match.start_index(10, 1.5), r"strength.*\[0, 1\]"),
        (lambda: flow_match.start_index(10, -0.1), r"strength.*\[0, 1\]"),
        (lambda: flow_match.start_index(10, float("nan")), "strength"),
        (lambda: flow_match.start_index(10, "0.5"), "strength"),
        (lambda: flow_match.sigmas(0), "num_steps.*>= 1"),
        (lambda: flow_match.sigmas(True), "num_steps"),
        (lambda: flow_match.sigmas(4, shift=0.0), "shift"),
        (lambda: flow_match.timesteps(np.ones(1)), "sigmas"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
