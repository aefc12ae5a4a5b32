"""The base generate pipeline, exercised with the toy task."""

import numpy as np
import pytest
import toy_models
from PIL import Image

IMAGE = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)


@pytest.fixture(scope="module")
def task():
    return toy_models.make_toy_task()


def test_unbatched_in_unbatched_out(task):
    out = task.generate({"images": IMAGE, "prompts": "red circle"}, 4, 2.0, 0.5, 0)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_batched_output(task):
    images = np.stack([IMAGE, IMAGE[::-1]])
    out = task.generate({"images": images, "prompts": ["red", "blue"]}, num_steps=3)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8


def test_shorthand_image_then_prompt(task):
    a = task.generate(IMAGE, "red circle", num_steps=4, seed=3)
    b = task.generate({"images": IMAGE, "prompts": "red circle"}, num_steps=4, seed=3)
    np.testing.assert_array_equal(a, b)
    c = task.generate(IMAGE, "red circle", 4, 2.0, 0.8, 3)
    np.testing.assert_array_equal(a, c)


def test_input_forms_agree(task):
    as_float = IMAGE.astype(np.float32) / 127.5 - 1
    pil = Image.fromarray(IMAGE)
    outs = [
        task.generate({"images": x, "prompts": "red"}, num_steps=2, seed=1)
        for x in (IMAGE, as_float, pil)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    batch = task.generate({"images": [pil, pil], "prompts": "red"}, num_steps=2, seed=1)
    assert batch.shape == (2, 16, 16, 3)


def test_seed_determinism(task):
    inputs = {"images": IMAGE, "prompts": "blue"}
    a = task.generate(inputs, num_steps=4, strength=1.0, seed=7)
    b = task.generate(inputs, num_steps=4, strength=1.0, seed=7)
    c = task.generate(inputs, num_steps=4, strength=1.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_injected_noise_replaces_seed(task):
    noise = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype("float32")
    inputs = {"images": IMAGE[None], "prompts": ["red"]}
    a = task.generate(inputs, num_steps=3, strength=1.0, seed=1, noise=noise)
    b = task.generate(inputs, num_steps=3, strength=1.0, seed=2, noise=noise)
    np.testing.assert_array_equal(a, b)


def test_resize_to_requested_size(task):
    out = task.generate(IMAGE, "red", num_steps=2, height=32, width=48)
    assert out.shape == (32, 48, 3)


def test_sampling_defaults_from_task_config():
    task = toy_models.make_toy_task()
    task.sampling = {"num_steps": 2, "height": 32, "width": 16}
    assert task.generate(IMAGE, "red").shape == (32, 16, 3)


def test_tf_data_batches_concatenated(task):
    tf = pytest.importorskip("tensorflow")
    images = np.stack([IMAGE] * 3)
    prompts = ["red", "blue", "red circle"]
    ds = tf.data.Dataset.from_tensor_slices({"images": images, "prompts": prompts})
    out = task.generate(ds.batch(2), num_steps=2, seed=0)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="missing \\['prompts'\\]"):
        task.generate(tf.data.Dataset.from_tensor_slices({"images": images}))
    with pytest.raises(ValueError, match="unknown \\['colour'\\]"):
        bad = tf.data.Dataset.from_tensor_slices(
            {"images": images, "prompts": prompts, "colour": prompts}
        )
        task.generate(bad)


BAD_CALLS = [
    # (inputs, kwargs, error type, message fragment)
    ({"images": IMAGE, "prompts": "x"}, {"strength": 1.5}, ValueError, "strength"),
    ({"images": IMAGE, "prompts": "x"}, {"strength": -0.1}, ValueError, "strength"),
    ({"images": IMAGE, "prompts": "x"}, {"num_steps": 0}, ValueError, "num_steps"),
    ({"images": IMAGE, "prompts": "x"}, {"num_steps": 2.5}, TypeError, "num_steps"),
    (
        {"images": IMAGE, "prompts": "x"},
        {"guidance_scale": float("nan")},
        ValueError,
        "guidance_scale",
    ),
    (
        {"images": IMAGE, "prompts": "x"},
        {"guidance_scale": "7"},
        TypeError,
        "guidance_scale",
    ),
    ({"images": IMAGE, "prompts": "x"}, {"seed": -1}, ValueError, "seed"),
    ({"images": IMAGE, "prompts": "x"}, {"height": 30}, ValueError, "height"),
    ({"images": IMAGE, "prompts": "x"}, {"width": 0}, ValueError, "width"),
    ({"images": IMAGE, "prompts": "x"}, {"colour": 1}, TypeError, "colour"),
    ({"images": IMAGE, "prompts": "x"}, {"callback": 3}, TypeError, "callback"),
    ({"images": IMAGE[..., 0], "prompts": "x"}, {}, ValueError, "rank 3"),
    ({"images": IMAGE[None, None], "prompts": "x"}, {}, ValueError, "rank 3"),
    ({"images": IMAGE[..., :1], "prompts": "x"}, {}, ValueError, "3 \\(RGB\\)"),
    (
        {"images": np.concatenate([IMAGE, IMAGE[..., :1]], -1), "prompts": "x"},
        {},
        ValueError,
        "3 \\(RGB\\)",
    ),
    (
        {"images": np.full((16, 16, 3), np.nan, "float32"), "prompts": "x"},
        {},
        ValueError,
        "NaN",
    ),
    (
        {"images": np.full((16, 16, 3), 2.0, "float32"), "prompts": "x"},
        {},
        ValueError,
        "\\[-1, 1\\]",
    ),
    ({"images": IMAGE.astype("int32"), "prompts": "x"}, {}, TypeError, "uint8"),
    ({"images": "image.png", "prompts": "x"}, {}, TypeError, "images"),
    ({"images": IMAGE, "prompts": 3}, {}, TypeError, "prompts"),
    ({"images": IMAGE, "prompts": None}, {}, TypeError, "prompts"),
    ({"images": IMAGE[None], "prompts": [["a"]]}, {}, TypeError, "prompts\\[0\\]"),
    (
        {"images": np.stack([IMAGE] * 2), "prompts": ["a"] * 3},
        {},
        ValueError,
        "batch of 2",
    ),
    ({"images": IMAGE, "prompts": ["a", "b"]}, {}, ValueError, "single string"),
    (
        {"images": IMAGE, "prompts": "x", "negative_prompts": [1]},
        {},
        TypeError,
        "negative_prompts",
    ),
    (
        {
            "images": np.stack([IMAGE] * 2),
            "prompts": "x",
            "negative_prompts": ["a"] * 3,
        },
        {},
        ValueError,
        "negative_prompts",
    ),
    ({"images": IMAGE, "prompts": "x", "mask": IMAGE}, {}, ValueError, "mask"),
    ({"prompts": "x"}, {}, ValueError, "'images'"),
    ({"images": IMAGE}, {}, ValueError, "'prompts'"),
    (IMAGE, {}, TypeError, "inputs"),
    (
        {"images": IMAGE, "prompts": "x"},
        {"noise": np.zeros((1, 8, 8, 3))},
        ValueError,
        "noise",
    ),
    (
        {"images": IMAGE, "prompts": "x"},
        {"posterior_noise": np.full((1, 16, 16, 3), np.nan)},
        ValueError,
        "posterior_noise",
    ),
]


@pytest.mark.parametrize("inputs, kwargs, error, message", BAD_CALLS)
def test_bad_inputs_raise_clear_errors(task, inputs, kwargs, error, message):
    calls = []
    original = task.encode_text
    task.encode_text = lambda *a: calls.append(a) or original(*a)
    try:
        with pytest.raises(error, match=message):
            task.generate(inputs, **kwargs)
    finally:
        del task.encode_text
    assert not calls, "validation must happen before any model work"
