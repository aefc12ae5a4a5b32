"""The `keras-diffusion img2img` command line."""

import os

import numpy as np
import pytest
from PIL import Image

from keras_diffusion import cli


@pytest.fixture(scope="module")
def input_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "in.png"
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = (40, 70, 200)
    image[16:48, 16:48] = (220, 40, 40)
    Image.fromarray(image).save(path)
    return str(path)


def _run(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_img2img_writes_png(input_png, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    code, stdout, _ = _run(
        [
            "img2img",
            "--preset",
            "sd3_tiny_demo",
            "--image",
            input_png,
            "--prompt",
            "a red circle on a blue background",
            "--steps",
            "2",
            "--strength",
            "0.5",
            "--seed",
            "3",
            "--quiet",
            "--output",
            str(out),
        ],
        capsys,
    )
    assert code == 0, stdout
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert "wrote" in stdout


def test_img2img_size_and_negative_prompt(input_png, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, _, err = _run(
        [
            "img2img",
            "--preset",
            "sd3_tiny_demo",
            "--image",
            input_png,
            "--prompt",
            "a cat",
            "--negative-prompt",
            "blurry",
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "48",
            "--guidance",
            "1.0",
            "--quiet",
            "--output",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert np.asarray(Image.open(out)).shape == (32, 48, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strength", "1.5"], "strength"),
        (["--steps", "0"], "num_steps"),
        (["--height", "50"], "height"),
        (["--preset", "no_such_preset"], "Unknown preset"),
    ],
)
def test_img2img_bad_arguments(input_png, tmp_path, capsys, extra, message):
    args = [
        "img2img",
        "--preset",
        "sd3_tiny_demo",
        "--image",
        input_png,
        "--prompt",
        "x",
        "--quiet",
        "--output",
        str(tmp_path / "o.png"),
    ]
    code, _, err = _run(args + extra, capsys)
    assert code == 2 and message in err
    assert not os.path.exists(tmp_path / "o.png")


def test_missing_and_unreadable_image(tmp_path, capsys):
    args = [
        "img2img",
        "--preset",
        "sd3_tiny_demo",
        "--prompt",
        "x",
        "--output",
        str(tmp_path / "o.png"),
    ]
    code, _, err = _run(args + ["--image", str(tmp_path / "nope.png")], capsys)
    assert code == 2 and "no such file" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, _, err = _run(args + ["--image", str(tmp_path / "bad.png")], capsys)
    assert code == 2 and "not a readable image" in err


def test_output_must_be_an_image_file(input_png, tmp_path, capsys):
    code, _, err = _run(
        [
            "img2img",
            "--preset",
            "sd3_tiny_demo",
            "--image",
            input_png,
            "--prompt",
            "x",
            "--output",
            str(tmp_path / "o.txt"),
        ],
        capsys,
    )
    assert code == 2 and "--output" in err


def test_missing_required_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["img2img", "--preset", "sd3_tiny_demo"])
    assert e.value.code == 2
    assert "--image" in capsys.readouterr().err
