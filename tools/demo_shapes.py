"""The demo's captioned shapes: a generator and a pixel-rule judge.

`make_dataset(n, seed)` draws images of one flat-coloured shape (circle,
square or upright triangle, near the middle, of random size) on a flat background
of another colour, captioned "a red circle on a blue background". `judge`
reads an image back with fixed pixel rules:

- every pixel is snapped to the nearest palette colour;
- background = the most common colour along the border;
- shape colour = the most common non-background colour;
- shape class = the nearest template: the largest 4-connected region of
  that colour is compared (intersection over union) with a circle, a square
  and a triangle placed on its centroid and sized from its area (a small
  search over position and size), and the best fit wins.

`judge_fill_ratio` is the earlier, stricter rule (the fill ratio of that
region's bounding box: circle ~0.785, square 1, triangle 0.5, nearest wins):
one stray bump stretches the box, so it reads a ragged square as a circle.
`perturb_outline` makes the judges' robustness check: ground truth with
bumps and bites along the outline and pixel noise, labels unchanged.

Shared by `tools/train_demo.py` (training data) and
`benchmarks/demo_quality.py` (the judge and its validation on these
ground-truth images).

    >>> images, prompts, labels = make_dataset(4, seed=0)
    >>> images.shape, images.dtype
    ((4, 64, 64, 3), dtype('uint8'))
    >>> [judge(image) for image in images] == labels
    True
    >>> rng = np.random.default_rng(0)
    >>> rough = [perturb_outline(im, lab, rng) for im, lab in zip(images, labels)]
    >>> [judge(image) for image in rough] == labels
    True
"""

import numpy as np

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 200),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def caption(colour, shape, background):
    return f"a {colour} {shape} on a {background} background"


def shape_mask(shape, centre, size, image_size=64):
    """Boolean `(..., image_size, image_size)` mask of `size`-wide shapes.

    `centre` is `(y, x)`; `y`, `x` and `size` may be arrays (of one shape),
    one mask per element.
    """
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    cy, cx = (np.asarray(c, np.float64)[..., None, None] for c in centre)
    half = np.asarray(size, np.float64)[..., None, None] / 2
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= half**2
    if shape == "square":
        return (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)
    if shape == "triangle":
        # Upright isosceles: apex at the top, base at the bottom of the box.
        top, bottom = cy - half, cy + half
        frac = (y - top) / (2 * half)  # 0 at the apex, 1 at the base
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * half)
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def draw(colour, shape, background, centre, size, image_size=64):
    """One image (uint8): a `size`-wide `shape` centred at `centre` (y, x)."""
    mask = shape_mask(shape, centre, size, image_size)
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = PALETTE[background]
    image[mask] = PALETTE[colour]
    return image


def random_label(rng, colours=COLOURS, shapes=SHAPES):
    colour = colours[rng.integers(len(colours))]
    shape = shapes[rng.integers(len(shapes))]
    others = [c for c in COLOURS if c != colour]
    background = others[rng.integers(len(others))]
    return colour, shape, background


def random_geometry(rng, image_size=64):
    """(centre, size): near the middle (within 6 pixels), 42-60% of the image.

    The jitter is small so that a few thousand CPU training steps suffice to
    learn each shape's outline; the shape always fits with a 4-pixel margin.
    """
    size = rng.uniform(0.42, 0.6) * image_size
    jitter = min(6.0, image_size / 2 - size / 2 - 4)
    centre = image_size / 2 + rng.uniform(-jitter, jitter, size=2)
    return tuple(centre), size


def make_dataset(n, seed=0, image_size=64):
    """`n` images, their captions and `(colour, shape, background)` labels."""
    rng = np.random.default_rng(seed)
    images, prompts, labels = [], [], []
    for _ in range(n):
        label = random_label(rng)
        centre, size = random_geometry(rng, image_size)
        images.append(draw(*label, centre, size, image_size))
        prompts.append(caption(*label))
        labels.append(label)
    return np.stack(images), prompts, labels


def snap(image):
    """Index of the nearest palette colour of every pixel, `(h, w)`."""
    palette = np.array(list(PALETTE.values()), np.float32)
    pixels = np.asarray(image, np.float32)[..., None, :]
    return np.argmin(((pixels - palette) ** 2).sum(-1), axis=-1)


def largest_component(mask):
    """(ys, xs) of the largest 4-connected region of a boolean mask."""
    seen = np.zeros_like(mask, bool)
    best = (np.array([], int), np.array([], int))
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, region = [start], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best[0]):
            best = tuple(np.array(c) for c in zip(*region))
    return best


# (area -> size factor, centroid offset / size from the box centre, in y)
_TEMPLATE_GEOMETRY = {
    "circle": (4 / np.pi, 0.0),
    "square": (1.0, 0.0),
    "triangle": (2.0, 1 / 6),  # area size^2 / 2; centroid 2/3 down the box
}
_SIZE_STEPS = np.linspace(0.9, 1.1, 5)
_SHIFT_STEPS = np.arange(-2.0, 2.5, 1.0)


def template_fits(mask):
    """Best intersection over union of `mask` with each shape's template.

    Each template sits on the mask's centroid, sized to the mask's area,
    then the best of +-2 pixels in y and x and +-10% in size is kept.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    fits = {}
    for shape, (area_factor, centroid_offset) in _TEMPLATE_GEOMETRY.items():
        size, dy, dx = np.meshgrid(
            np.sqrt(area_factor * len(ys)) * _SIZE_STEPS,
            _SHIFT_STEPS,
            _SHIFT_STEPS,
            indexing="ij",
        )
        centre = (cy - centroid_offset * size + dy, cx + dx)
        templates = shape_mask(shape, centre, size, mask.shape[0])
        inter = (templates & mask).sum((-2, -1))
        union = (templates | mask).sum((-2, -1))
        fits[shape] = float((inter / union).max())
    return fits


def _read(image):
    """(colour index or None, background index, palette-index image)."""
    index = snap(image)
    border = np.concatenate([index[0], index[-1], index[1:-1, 0], index[1:-1, -1]])
    counts = np.bincount(border, minlength=len(COLOURS))
    background = int(np.argmax(counts))
    inside = np.bincount(index.ravel(), minlength=len(COLOURS))
    inside[background] = 0
    colour = int(np.argmax(inside)) if inside.sum() else None
    return colour, background, index


def judge_details(image):
    """`((colour, shape, background), template fits)`; see the module doc."""
    colour, background, index = _read(image)
    if colour is None:
        return (None, None, COLOURS[background]), {}
    mask = np.zeros(index.shape, bool)
    mask[largest_component(index == colour)] = True
    fits = template_fits(mask)
    shape = max(fits, key=fits.get)
    return (COLOURS[colour], shape, COLOURS[background]), fits


def judge(image):
    """`(colour, shape, background)` read from a uint8 image by pixel rules."""
    return judge_details(image)[0]


def judge_fill_ratio(image):
    """As `judge`, with the shape from the bounding-box fill ratio."""
    colour, background, index = _read(image)
    if colour is None:
        return None, None, COLOURS[background]
    ys, xs = largest_component(index == colour)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    shape = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))
    return COLOURS[colour], shape, COLOURS[background]


def perturb_outline(image, label, rng, noise=8.0):
    """`image` with 1-4 discs (radius 1.5-3.5 px) of the shape's colour
    (bumps) or the background's (bites) centred on its outline, and gaussian
    pixel noise: still the labelled shape to a person."""
    colour, _, background = label
    shape = np.all(image == PALETTE[colour], axis=-1)
    inner = shape.copy()
    inner[1:-1, 1:-1] &= (
        shape[:-2, 1:-1] & shape[2:, 1:-1] & shape[1:-1, :-2] & shape[1:-1, 2:]
    )
    ys, xs = np.nonzero(shape & ~inner)
    y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    out = image.astype(np.float64)
    for _ in range(rng.integers(1, 5)):
        k = rng.integers(len(ys))
        radius = rng.uniform(1.5, 3.5)
        disc = (y - ys[k]) ** 2 + (x - xs[k]) ** 2 <= radius**2
        out[disc] = PALETTE[colour if rng.random() < 0.5 else background]
    out += rng.normal(0.0, noise, out.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)
