"""Train the tiny demo SD3 and save it as `presets/sd3_tiny_demo/`.

Reproducible from a seed, on 2 CPU cores, in under 20 minutes (torch is the
fastest backend for this small model's training steps):

1. data: `tools/demo_shapes.py` draws captioned images ("a red circle on a
   blue background": one flat shape near the middle of a flat background,
   of random size);
2. the model: `tools/build_demo_preset.py`'s tiny SD3 (its tokenizers, its
   text encoders, which stay random and frozen, as a fixed text embedding)
   with the MMDiT's position table set to 2D sin-cos;
3. the VAE: trained first, as an autoencoder (L1 reconstruction plus a small
   KL term, the posterior sampled) with plain Keras `fit` on random crops;
   its latent `shift_factor` / `scaling_factor` are then set from the
   latents' statistics, as SD3's are;
4. the MMDiT: the task's own `fit` (rectified flow, logit-normal `t`, prompt
   dropout 0.1 so classifier-free guidance works) on the cached VAE latents
   and text embeddings (`task.precompute`), AdamW with a warm-up and cosine
   decay, weights averaged (EMA);
5. `task.save_to_preset`, which writes to a temporary sibling folder and
   renames it into place (an interrupted run leaves the old preset intact).

    KERAS_BACKEND=torch python tools/train_demo.py [--seed 0] [--output DIR]

`benchmarks/demo_quality.py` measures the result.
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(ROOT, "src"))

import build_demo_preset  # noqa: E402
import demo_shapes  # noqa: E402
import keras  # noqa: E402
from keras import ops  # noqa: E402

DEFAULTS = dict(
    num_images=8000,
    vae_steps=700,
    vae_batch_size=32,
    vae_crop=24,
    vae_learning_rate=3e-3,
    kl_weight=1e-3,
    mmdit_steps=4500,
    mmdit_batch_size=32,
    mmdit_learning_rate=2e-3,
    ema_momentum=0.999,
)


class Autoencoder(keras.Model):
    """The VAE as a plain Keras model: sampled posterior, L1 + KL loss."""

    def __init__(self, vae, kl_weight, seed, **kwargs):
        super().__init__(**kwargs)
        self.vae = vae
        self.kl_weight = kl_weight
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        mean, log_variance = self.vae.encode(images)
        noise = keras.random.normal(ops.shape(mean), seed=self.seed_generator)
        z = mean + ops.exp(0.5 * log_variance) * noise
        return self.vae.decode(z), mean, log_variance

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        reconstruction, mean, log_variance = y_pred
        l1 = ops.mean(ops.abs(reconstruction - x))
        kl = 0.5 * ops.mean(mean**2 + ops.exp(log_variance) - 1.0 - log_variance)
        return l1 + self.kl_weight * kl


def random_crops(images, crop, rng):
    """One random `crop` x `crop` window of every image (float in [-1, 1])."""
    n, h, w, _ = images.shape
    ys = rng.integers(0, h - crop + 1, n)
    xs = rng.integers(0, w - crop + 1, n)
    out = np.stack([im[y : y + crop, x : x + crop] for im, y, x in zip(images, ys, xs)])
    return out.astype("float32") / 127.5 - 1.0


def schedule(learning_rate, steps):
    warmup = max(1, steps // 20)
    return keras.optimizers.schedules.CosineDecay(
        learning_rate / 10,
        decay_steps=steps - warmup,
        alpha=0.05,
        warmup_target=learning_rate,
        warmup_steps=warmup,
    )


def train_vae(backbone, images, settings, seed, log):
    rng = np.random.default_rng(seed + 1)
    n = settings["vae_steps"] * settings["vae_batch_size"]
    picks = rng.integers(0, len(images), n)
    crops = random_crops(images[picks], settings["vae_crop"], rng)
    backbone.vae.trainable = True
    model = Autoencoder(backbone.vae, settings["kl_weight"], seed)
    model.compile(
        optimizer=keras.optimizers.Adam(
            schedule(settings["vae_learning_rate"], settings["vae_steps"]),
            clipnorm=1.0,
        )
    )
    history = model.fit(
        crops,
        crops,
        batch_size=settings["vae_batch_size"],
        epochs=1,
        shuffle=False,
        verbose=log,
    )
    backbone.vae.trainable = False
    return history.history["loss"][-1]


def latent_statistics(backbone, images, batch_size=64):
    """(mean, std) of posterior samples of `images`' latents."""
    rng = np.random.default_rng(0)
    encode = backbone.vae.encode
    samples = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].astype("float32") / 127.5 - 1.0
        mean, log_variance = (ops.convert_to_numpy(v) for v in encode(x))
        noise = rng.standard_normal(mean.shape).astype("float32")
        samples.append(mean + np.exp(0.5 * log_variance) * noise)
    samples = np.concatenate(samples)
    return float(samples.mean()), float(samples.std())


def with_latent_scaling(task, shift, scale, seed):
    """The same task with the VAE's `shift_factor` / `scaling_factor` set."""
    from keras_diffusion.models import (
        StableDiffusion3Backbone,
        StableDiffusion3ImageToImage,
    )

    old = task.backbone
    config = old.get_config()
    config["vae"] = dict(config["vae"], shift_factor=shift, scaling_factor=scale)
    backbone = StableDiffusion3Backbone.from_config(config)
    backbone.set_weights(old.get_weights())
    return StableDiffusion3ImageToImage(
        backbone,
        task.preprocessor,
        sampling=task.sampling,
        prompt_dropout=0.1,
        seed=seed,
    )


def train_mmdit(task, cache, settings, log):
    steps, batch = settings["mmdit_steps"], settings["mmdit_batch_size"]
    task.compile(
        optimizer=keras.optimizers.AdamW(
            schedule(settings["mmdit_learning_rate"], steps),
            weight_decay=1e-2,
            clipnorm=1.0,
            use_ema=True,
            ema_momentum=settings["ema_momentum"],
        )
    )
    per_epoch = len(next(iter(cache.values()))) // batch
    epochs = -(-steps // per_epoch)
    history = task.fit(
        cache,
        batch_size=batch,
        epochs=epochs,
        steps_per_epoch=min(per_epoch, steps),
        verbose=log,
    )
    return history.history["loss"]


def train(seed=0, log=2, **overrides):
    """The trained task (see the module docstring); prints stage timings."""
    settings = {**DEFAULTS, **overrides}
    keras.utils.set_random_seed(seed)
    start = time.time()

    def stage(name):
        print(f"[{time.time() - start:7.1f}s] {name}", flush=True)

    task = build_demo_preset.build_task(seed)
    images, prompts, _ = demo_shapes.make_dataset(settings["num_images"], seed)
    stage(f"dataset: {len(images)} images; training the VAE")
    loss = train_vae(task.backbone, images, settings, seed, log)
    shift, std = latent_statistics(task.backbone, images[:1024])
    stage(f"VAE loss {loss:.4f}; latent shift {shift:.4f}, scale {1 / std:.4f}")
    task = with_latent_scaling(task, shift, 1.0 / std, seed)
    cache = task.precompute({"images": images, "prompts": prompts}, batch_size=64)
    stage("cached latents and text embeddings; training the MMDiT")
    losses = train_mmdit(task, cache, settings, log)
    stage(f"MMDiT loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return task


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output", default=os.path.join(ROOT, "presets", "sd3_tiny_demo")
    )
    parser.add_argument("--seed", type=int, default=0)
    for name, value in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--verbose", type=int, default=2)
    args = vars(parser.parse_args())
    output, seed, log = args.pop("output"), args.pop("seed"), args.pop("verbose")
    start = time.time()
    task = train(seed, log, **args)
    task.save_to_preset(output)
    print(
        f"wrote {output}: {task.backbone.count_params():,} parameters; "
        f"{time.time() - start:.0f}s on {keras.backend.backend()}"
    )


if __name__ == "__main__":
    main()
