"""Flow-matching Euler sampling for Stable Diffusion 3, as small pure functions.

The schedule reproduces diffusers' `FlowMatchEulerDiscreteScheduler` with
SD3's configuration (1000 training timesteps, `shift=3.0`, no dynamic
shifting), value for value:

- `sigmas(num_steps)` is host-side numpy: `num_steps + 1` noise levels from
  1 down to 0, handed to a compiled sampling loop as an input.
- `timesteps(sigmas)` is what the MMDiT is conditioned on, `1000 * sigma`.
- `start_index(num_steps, strength)` is where image-to-image starts in the
  schedule (diffusers' `get_timesteps` arithmetic).
- `add_noise` and `euler_step` are `keras.ops` code that runs in float32 on
  any backend and inside a compiled loop.

A full image-to-image loop is then:

```
s = sigmas(num_steps)
t = timesteps(s)
i0 = start_index(num_steps, strength)
x = add_noise(x0, noise, s[i0])
for i in range(i0, num_steps):
    x = euler_step(x, velocity(x, t[i]), s[i], s[i + 1])
```
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

NUM_TRAIN_TIMESTEPS = 1000


def _check_num_steps(num_steps):
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, numbers.Integral)
        or num_steps < 1
    ):
        raise ValueError(f"`num_steps` must be an integer >= 1; got {num_steps!r}.")
    return int(num_steps)


def _shift(sigma, shift):
    # The SD3 timestep shift, in whatever precision `sigma` carries.
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigmas(num_steps, shift=3.0, *, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """Noise levels of the SD3 flow-matching Euler schedule.

    Equal to diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift)`
    `.set_timesteps(num_steps)` followed by `.sigmas`. The schedule runs
    evenly in time between the shifted noise levels of the first and the
    last training timestep, and is then shifted again, so the last non-zero
    sigma is the training minimum shifted twice (0.008929 for `shift=3`).
    The precision follows diffusers step for step: the training levels in
    float32, the inference schedule in float64, then rounded to float32.

    Args:
        num_steps: int >= 1, the number of sampling steps.
        shift: float > 0, the timestep shift (SD3 uses 3.0).
        num_train_timesteps: int, the length of the training schedule.

    Returns:
        A float32 numpy array of `num_steps + 1` values, from 1 down to a
        final 0.

    Examples:

    >>> [round(float(s), 6) for s in sigmas(4)]
    [1.0, 0.857692, 0.602151, 0.008929, 0.0]
    """
    num_steps = _check_num_steps(num_steps)
    if not (isinstance(shift, numbers.Real) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"`shift` must be a finite number > 0; got {shift!r}.")
    num_train_timesteps = _check_num_steps(num_train_timesteps)
    # Training noise levels at the first and last training timesteps, in
    # float32 as diffusers computes them (t / T, then shifted).
    train_t = np.array([num_train_timesteps, 1], dtype=np.float32)
    train_sigmas = _shift(train_t / np.float32(num_train_timesteps), np.float32(shift))
    sigma_max, sigma_min = (float(s) for s in train_sigmas)
    # Inference schedule: even in time between them, in float64, shifted again.
    t = np.linspace(
        sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps
    )
    schedule = _shift(t / num_train_timesteps, float(shift)).astype(np.float32)
    return np.concatenate([schedule, np.zeros(1, np.float32)])


def timesteps(sigmas, *, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """Model timesteps for a schedule: `sigma * 1000` for all but the last.

    Matches diffusers' `scheduler.timesteps` (float32).

    Args:
        sigmas: the array returned by `sigmas()`.
        num_train_timesteps: int, the length of the training schedule.

    Returns:
        A float32 numpy array of `len(sigmas) - 1` values.

    Examples:

    >>> [round(float(t), 3) for t in timesteps(sigmas(4))]
    [1000.0, 857.692, 602.151, 8.929]
    """
    sigmas = np.asarray(sigmas, dtype=np.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            "`sigmas` must be a 1-D array of at least 2 values (the output of "
            f"`sigmas()`); got shape {sigmas.shape}."
        )
    return sigmas[:-1] * np.float32(num_train_timesteps)


def start_index(num_steps, strength):
    """Index of the first step that image-to-image runs.

    Uses diffusers' `StableDiffusion3Img2ImgPipeline.get_timesteps`
    arithmetic, `int(max(N - min(N * strength, N), 0))`; the loop then runs
    steps `start_index .. num_steps - 1` (`strength=1` runs them all,
    `strength=0` none).

    Args:
        num_steps: int >= 1, the number of steps of the full schedule.
        strength: float in [0, 1], how much of the schedule to run.

    Returns:
        A Python int in `[0, num_steps]`.

    Examples:

    >>> start_index(50, 0.8)
    10
    >>> start_index(28, 1.0)
    0
    """
    num_steps = _check_num_steps(num_steps)
    if (
        isinstance(strength, bool)
        or not isinstance(strength, numbers.Real)
        or not 0.0 <= strength <= 1.0
    ):
        raise ValueError(f"`strength` must be a number in [0, 1]; got {strength!r}.")
    init_steps = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_steps, 0))


def _sigma_like(sigma, x):
    # A float32 scalar, or a per-batch vector reshaped to broadcast over `x`.
    sigma = ops.cast(sigma, "float32")
    if len(sigma.shape) == 1:
        sigma = ops.reshape(sigma, (-1,) + (1,) * (len(x.shape) - 1))
    elif len(sigma.shape) > 1:
        raise ValueError(
            "`sigma` must be a scalar or a per-batch vector; got shape "
            f"{tuple(sigma.shape)}."
        )
    return sigma


def add_noise(x0, noise, sigma):
    """Noise clean latents to level `sigma`: `sigma*noise + (1-sigma)*x0`.

    The flow-matching forward process (diffusers' `scale_noise`). Computed
    in float32 and cast back to `x0`'s dtype.

    Args:
        x0: clean latents, `(B, ...)`.
        noise: standard normal noise of the same shape.
        sigma: a scalar, or a `(B,)` vector of per-sample noise levels.

    Returns:
        The noised latents, shaped and typed like `x0`.

    Examples:

    >>> import numpy as np
    >>> from keras import ops
    >>> x0 = np.ones((1, 2, 2, 16), "float32")
    >>> noise = np.zeros((1, 2, 2, 16), "float32")
    >>> float(ops.max(add_noise(x0, noise, 0.25)))
    0.75
    """
    x0 = ops.convert_to_tensor(x0)
    dtype = keras.backend.standardize_dtype(x0.dtype)
    x0_32 = ops.cast(x0, "float32")
    sigma = _sigma_like(sigma, x0)
    noisy = sigma * ops.cast(noise, "float32") + (1.0 - sigma) * x0_32
    return ops.cast(noisy, dtype)


def euler_step(x, velocity, sigma, sigma_next):
    """One Euler step of the flow ODE: `x + (sigma_next - sigma) * velocity`.

    Computed in float32 and cast back to `x`'s dtype.

    Args:
        x: latents at noise level `sigma`.
        velocity: the model's velocity prediction, shaped like `x`.
        sigma: current noise level, a scalar or a `(B,)` vector.
        sigma_next: next noise level, same form as `sigma`.

    Returns:
        The latents at `sigma_next`, shaped and typed like `x`.

    Examples:

    >>> import numpy as np
    >>> from keras import ops
    >>> x = np.zeros((1, 2, 2, 16), "float32")
    >>> v = np.ones((1, 2, 2, 16), "float32")
    >>> float(ops.min(euler_step(x, v, 1.0, 0.75)))
    -0.25
    """
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    dt = _sigma_like(sigma_next, x) - _sigma_like(sigma, x)
    out = ops.cast(x, "float32") + dt * ops.cast(velocity, "float32")
    return ops.cast(out, dtype)
