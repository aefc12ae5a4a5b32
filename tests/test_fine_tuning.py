"""`ImageToImage.fit`: SD3's rectified-flow fine-tuning, on the demo preset.

One module-scoped run trains the demo model on a fixed batch (one compiled
train step per backend; compiling dominates the time); the tests read its
record. Losses are compared at a fixed seed-generator state, so "before"
and "after", raw and cached, see the same noise, timesteps and dropout.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from keras_diffusion.models import StableDiffusion3ImageToImage
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_backbone import (
    StableDiffusion3Backbone,
)

STEPS = 10
PROMPTS = ["a red circle on a blue background", "a blue square"]


def _images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


def _snapshot(variables):
    return {v.path: np.array(ops.convert_to_numpy(v)) for v in variables}


def _loss_at(task, inputs, state):
    """`evaluate`'s loss with the seed generator reset to `state`."""
    task.seed_generator.state.assign(state)
    return task.evaluate(inputs, batch_size=2, verbose=0, return_dict=True)["loss"]


@pytest.fixture(scope="module")
def run():
    task = kd.models.ImageToImage.from_preset("sd3_tiny_demo", seed=1)
    raw = {"images": _images(), "prompts": PROMPTS}
    record = {"task": task, "raw": raw, "before": _snapshot(task.backbone.weights)}
    record["cache"] = task.precompute(raw)
    task.compile(optimizer=keras.optimizers.AdamW(5e-3, clipnorm=1.0))
    state = np.array(ops.convert_to_numpy(task.seed_generator.state))
    record["state"] = state
    record["loss_before"] = _loss_at(task, record["cache"], state)
    history = task.fit(raw, batch_size=2, epochs=STEPS, shuffle=False, verbose=0)
    record["history"] = history.history["loss"]
    record["after"] = _snapshot(task.backbone.weights)
    record["loss_after"] = _loss_at(task, record["cache"], state)
    record["loss_after_raw"] = _loss_at(task, raw, state)
    print("fit loss per step:", np.round(record["history"], 3).tolist())
    print("fixed-seed loss:", record["loss_before"], "->", record["loss_after"])
    return record


def test_loss_decreases(run):
    assert np.all(np.isfinite(run["history"]))
    assert run["loss_after"] < 0.9 * run["loss_before"]
    history = np.asarray(run["history"])
    assert history[-3:].mean() < history[:3].mean()


def test_only_the_mmdit_trains(run):
    changed = {
        p
        for p in run["before"]
        if not np.array_equal(run["before"][p], run["after"][p])
    }
    frozen = [p for p in run["before"] if not p.startswith("mmdit/")]
    assert frozen and not changed.intersection(frozen)
    assert "mmdit/position_embedding" not in changed  # non-trainable buffer
    mmdit = {v.path for v in run["task"].backbone.mmdit.trainable_weights}
    assert mmdit and mmdit <= changed
    trainable = {v.path for v in run["task"].trainable_weights}
    assert trainable == mmdit


def test_cached_inputs_give_the_same_loss(run):
    assert set(run["cache"]) == {
        "latent_mean",
        "latent_log_variance",
        "context",
        "pooled",
    }
    np.testing.assert_allclose(run["loss_after"], run["loss_after_raw"], rtol=1e-5)
    # Float images in [-1, 1] are the same inputs as uint8 ones.
    floats = run["raw"]["images"].astype("float32") / 127.5 - 1.0
    again = run["task"].precompute({"images": floats, "prompts": PROMPTS})
    for key, value in run["cache"].items():
        np.testing.assert_allclose(again[key], value, atol=1e-5, err_msg=key)


def test_tf_data_inputs(run):
    tf = pytest.importorskip("tensorflow")
    task, raw, state = run["task"], run["raw"], run["state"]
    cached = tf.data.Dataset.from_tensor_slices(run["cache"]).batch(
        2, drop_remainder=True
    )
    np.testing.assert_allclose(
        _loss_at(task, cached, state), run["loss_after"], rtol=1e-5
    )
    # Raw images and prompts, tokenized inside the pipeline: the same loss.
    dataset = tf.data.Dataset.from_tensor_slices(raw).batch(2, drop_remainder=True)
    np.testing.assert_allclose(
        _loss_at(task, dataset, state), run["loss_after_raw"], rtol=1e-5
    )
    before = _snapshot(task.backbone.mmdit.trainable_weights)
    history = task.fit(dataset, epochs=1, shuffle=False, verbose=0).history["loss"]
    after = _snapshot(task.backbone.mmdit.trainable_weights)
    assert np.isfinite(history[0])
    assert any(not np.array_equal(before[p], after[p]) for p in before)
    with pytest.raises(ValueError, match="batched"):
        task.fit(tf.data.Dataset.from_tensor_slices(raw), epochs=1, verbose=0)


def test_prompt_dropout_one_gives_the_empty_prompt_loss(run):
    task = run["task"]
    empty = task.precompute({"images": run["raw"]["images"], "prompts": ["", ""]})
    task.compile(prompt_dropout=1.0)
    a = _loss_at(task, run["cache"], run["state"])
    b = _loss_at(task, empty, run["state"])
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert abs(a - run["loss_after"]) > 1e-3  # the prompts mattered before
    assert task.prompt_dropout == 1.0


class Record:
    """What the hooks saw (a plain object, so Keras does not track it)."""

    def __init__(self):
        self.ids = []


class RecordingTask(StableDiffusion3ImageToImage):
    """Training hooks that record what the base step hands them.

    The encoders are replaced by cheap stand-ins (the conditioning is the
    token ids as floats), so the step runs eagerly in well under a second.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = Record()

    def train_encode_images(self, images):
        mean = ops.ones((ops.shape(images)[0], 2, 2, 16)) * 0.5
        return mean, ops.zeros_like(mean)

    def train_encode_prompts(self, token_ids):
        self.seen.ids.append({k: ops.convert_to_numpy(v) for k, v in token_ids.items()})
        return {"context": ops.cast(token_ids["clip_l"], "float32")}

    def train_latents(self, mean, log_variance, noise):
        return mean

    def train_velocity(self, latents, t, conditioning):
        self.seen.latents = ops.convert_to_numpy(latents)
        self.seen.t = ops.convert_to_numpy(t)
        self.seen.context = ops.convert_to_numpy(conditioning["context"])
        return ops.zeros_like(latents)


def _recording(run, **kwargs):
    task = run["task"]
    return RecordingTask(task.backbone, task.preprocessor, seed=0, **kwargs)


def _token_inputs(task, prompts):
    ids = task.preprocessor.generate_preprocess(prompts)
    return {"images": np.zeros((len(prompts), 64, 64, 3), "float32"), **ids}


def test_prompt_dropout_feeds_empty_prompt_ids(run):
    task = _recording(run, prompt_dropout=1.0)
    task(_token_inputs(task, PROMPTS), training=True)
    empty = task.preprocessor.generate_preprocess([""])
    (ids,) = task.seen.ids
    for key in ("clip_l", "clip_g"):
        np.testing.assert_array_equal(ids[key], np.repeat(empty[key], 2, axis=0))
    kept = _recording(run, prompt_dropout=0.0)
    inputs = _token_inputs(kept, PROMPTS)
    kept(inputs, training=True)
    np.testing.assert_array_equal(kept.seen.ids[0]["clip_l"], inputs["clip_l"])


def test_prompt_dropout_with_cached_conditioning(run):
    task = _recording(run, prompt_dropout=1.0)
    length = task.preprocessor.clip_l_tokenizer.sequence_length
    context = np.full((2, length), 7.0, "float32")
    mean = np.zeros((2, 2, 2, 16), "float32")
    task(
        {"latent_mean": mean, "latent_log_variance": mean, "context": context},
        training=True,
    )
    (ids,) = task.seen.ids  # only "" was encoded
    assert ids["clip_l"].shape[0] == 1
    empty = task.preprocessor.generate_preprocess([""])["clip_l"]
    np.testing.assert_array_equal(task.seen.context, np.repeat(empty, 2, 0))


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_interpolation_target_and_timesteps(run, sampling):
    task = _recording(run, timestep_sampling=sampling, prompt_dropout=0.0)
    inputs = _token_inputs(task, [""] * 512)
    prediction, target = task(inputs, training=True)
    t = task.seen.t
    x0 = np.full((512, 2, 2, 16), 0.5, "float32")
    eps = ops.convert_to_numpy(target) + x0  # target = eps - x0
    tb = t[:, None, None, None]
    np.testing.assert_allclose(task.seen.latents, (1 - tb) * x0 + tb * eps, atol=1e-5)
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    assert t.min() > 0 and t.max() < 1
    if sampling == "uniform":
        assert abs(t.mean() - 0.5) < 0.05 and abs(t.std() - 0.2887) < 0.03
    else:
        logits = np.log(t / (1 - t))
        assert abs(logits.mean()) < 0.15 and abs(logits.std() - 1) < 0.1


def test_predict_returns_prediction_and_target(run):
    task = _recording(run)
    task.compile(run_eagerly=True)
    prediction, target = task.predict(run["raw"], batch_size=2, verbose=0)
    assert prediction.shape == target.shape == (2, 2, 2, 16)


def test_task_config_round_trip(run, tmp_path):
    task = run["task"]
    task.compile(prompt_dropout=0.25)
    config = task.get_config()
    assert config["timestep_sampling"] == "logit_normal"
    assert config["prompt_dropout"] == 0.25
    assert config["trainable_components"] == ["mmdit"]
    own = task.task_config()
    restored = StableDiffusion3ImageToImage(task.backbone, task.preprocessor, **own)
    assert restored.task_config() == own
    uniform = StableDiffusion3ImageToImage(
        task.backbone,
        task.preprocessor,
        timestep_sampling="uniform",
        prompt_dropout=0.3,
    )
    uniform.save_to_preset(tmp_path / "p")
    loaded = kd.models.ImageToImage.from_preset(str(tmp_path / "p"))
    assert loaded.timestep_sampling == "uniform" and loaded.prompt_dropout == 0.3


def test_trainable_components_and_bad_settings(run):
    task = _recording(run, trainable_components=("mmdit", "vae"))
    assert task.backbone.vae.trainable and not task.backbone.clip_l.trainable
    task.trainable_components = "mmdit"
    assert not task.backbone.vae.trainable and task.backbone.mmdit.trainable
    with pytest.raises(ValueError, match="Unknown trainable component"):
        task.trainable_components = ("unet",)
    with pytest.raises(ValueError, match="timestep_sampling"):
        _recording(run, timestep_sampling="cosine")
    with pytest.raises(ValueError, match="prompt_dropout"):
        task.compile(prompt_dropout=1.5)
    with pytest.raises(ValueError, match="`y` must be None"):
        task.fit(run["raw"], np.zeros(2))
    with pytest.raises(ValueError, match="'images' and 'prompts'"):
        task.fit({"pictures": run["raw"]["images"]})


class WholeContextTask(StableDiffusion3ImageToImage):
    """The reference: trains on the whole context, its zero T5 tail included."""

    def train_velocity(self, latents, t, conditioning):
        context = ops.cast(conditioning["context"], self.backbone.compute_dtype)
        pooled = ops.cast(conditioning["pooled"], self.backbone.compute_dtype)
        return self.backbone.guided_velocity(latents, context, pooled, t, 1.0, False)


def test_zero_t5_tail_trains_as_one_token(run, monkeypatch):
    """Without T5 the context's zero tail trains as one token, as `generate`
    runs it: the same velocity, and one SGD step moves every weight as
    training on the whole context does."""
    collapsed = []
    collapse = StableDiffusion3Backbone.collapse_context

    def recording(self, context, t5_ran):
        out = collapse(self, context, t5_ran)
        collapsed.append((context.shape[1], out[0].shape[1], out[1]))
        return out

    monkeypatch.setattr(StableDiffusion3Backbone, "collapse_context", recording)
    ours = kd.models.ImageToImage.from_preset("sd3_tiny_demo", seed=1)
    loaded = kd.models.ImageToImage.from_preset("sd3_tiny_demo", seed=1)
    whole = WholeContextTask(loaded.backbone, loaded.preprocessor, seed=1)
    assert ours.backbone.t5 is None and ours.backbone.t5_sequence_length == 2

    conditioning = ours.precompute(run["raw"])
    full = ours.backbone.clip_l.max_sequence_length + 2
    assert conditioning["context"].shape[1] == full  # precompute keeps every token
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 8, 8, 16)).astype("float32")
    t = np.array([0.3, 0.8], "float32")
    collapsed.clear()
    velocity = ours.train_velocity(latents, t, conditioning)
    assert collapsed == [(full, full - 1, 2)]
    reference = whole.train_velocity(latents, t, conditioning)
    np.testing.assert_allclose(
        ops.convert_to_numpy(velocity), ops.convert_to_numpy(reference), atol=1e-5
    )

    before = _snapshot(ours.backbone.mmdit.trainable_weights)
    for task in (ours, whole):
        task.compile(optimizer=keras.optimizers.SGD(0.5))
        task.fit(run["raw"], batch_size=2, epochs=1, shuffle=False, verbose=0)
    a = _snapshot(ours.backbone.mmdit.trainable_weights)
    b = _snapshot(whole.backbone.mmdit.trainable_weights)
    step = max(np.abs(a[p] - before[p]).max() for p in a)
    error = max(np.abs(a[p] - b[p]).max() for p in a)
    print(f"largest update {step:.3g}, largest difference {error:.3g}")
    assert step > 1e-2 and error < 1e-5
