"""`tools/demo_shapes.py`: the demo's data generator and its pixel-rule judge.

The judge is what `benchmarks/demo_quality.py`'s adherence numbers rest on,
so it is checked here on images whose labels are known by construction.
"""

import doctest
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import demo_shapes as shapes  # noqa: E402


def test_doctests():
    result = doctest.testmod(shapes)
    assert result.attempted > 0 and result.failed == 0


def test_judge_reads_ground_truth_and_rough_outlines():
    images, _, labels = shapes.make_dataset(90, seed=7)
    assert [shapes.judge(im) for im in images] == labels
    rng = np.random.default_rng(7)
    rough = [shapes.perturb_outline(im, lab, rng) for im, lab in zip(images, labels)]
    assert not any(np.array_equal(a, b) for a, b in zip(images, rough))
    assert [shapes.judge(im) for im in rough] == labels


def test_template_fits_separate_the_shapes():
    for shape in shapes.SHAPES:
        mask = shapes.shape_mask(shape, (31.0, 33.0), 30.0)
        fits = shapes.template_fits(mask)
        assert fits[shape] > 0.97
        others = [v for k, v in fits.items() if k != shape]
        assert max(others) < 0.87, (shape, fits)


def test_a_bump_fools_the_fill_ratio_rule_not_the_template_rule():
    image = shapes.draw("red", "square", "blue", (32.0, 32.0), 30.0)
    image[11:17, 40:43] = shapes.PALETTE["red"]  # a 6x3 tab above the top edge
    assert shapes.judge_fill_ratio(image) == ("red", "circle", "blue")
    assert shapes.judge(image) == ("red", "square", "blue")


@pytest.mark.parametrize(
    "drawn, prompted", [("circle", "square"), ("triangle", "circle")]
)
def test_the_wrong_shape_is_not_read_as_the_prompted_one(drawn, prompted):
    image = shapes.draw("green", drawn, "white", (30.0, 34.0), 32.0)
    assert shapes.judge(image)[1] == drawn != prompted


def test_a_flat_image_has_no_shape():
    image = np.full((64, 64, 3), shapes.PALETTE["yellow"], np.uint8)
    assert shapes.judge(image) == (None, None, "yellow")
    assert shapes.judge_details(image)[1] == {}


def test_unknown_shape_names_the_accepted_ones():
    with pytest.raises(ValueError, match="hexagon.*circle"):
        shapes.shape_mask("hexagon", (32, 32), 20)
