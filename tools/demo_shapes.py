"""The demo's captioned shapes: a generator and a pixel-rule judge.

`make_dataset(n, seed)` draws images of one flat-coloured shape (circle,
square or upright triangle, near the middle, of random size) on a flat background
of another colour, captioned "a red circle on a blue background". `judge`
reads an image back with fixed pixel rules:

- every pixel is snapped to the nearest palette colour;
- background = the most common colour along the border;
- shape colour = the most common non-background colour;
- shape class = the fill ratio of the bounding box of that colour's largest
  4-connected region (stray pixels elsewhere do not stretch the box):
  circle ~0.785, square ~1, triangle ~0.5 (nearest wins).

Shared by `tools/train_demo.py` (training data) and
`benchmarks/demo_quality.py` (the judge and its validation on these
ground-truth images).

    >>> images, prompts, labels = make_dataset(4, seed=0)
    >>> images.shape, images.dtype
    ((4, 64, 64, 3), dtype('uint8'))
    >>> [judge(image) for image in images] == labels
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


def draw(colour, shape, background, centre, size, image_size=64):
    """One image (uint8): a `size`-wide `shape` centred at `centre` (y, x)."""
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    cy, cx = centre
    half = size / 2
    if shape == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= half**2
    elif shape == "square":
        mask = (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)
    elif shape == "triangle":
        # Upright isosceles: apex at the top, base at the bottom of the box.
        top, bottom = cy - half, cy + half
        frac = (y - top) / size  # 0 at the apex, 1 at the base
        mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * half)
    else:
        raise ValueError(f"Unknown shape {shape!r}.")
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


def judge(image):
    """`(colour, shape, background)` read from a uint8 image by pixel rules."""
    index = snap(image)
    border = np.concatenate([index[0], index[-1], index[1:-1, 0], index[1:-1, -1]])
    counts = np.bincount(border, minlength=len(COLOURS))
    background = int(np.argmax(counts))
    inside = np.bincount(index.ravel(), minlength=len(COLOURS))
    inside[background] = 0
    if inside.sum() == 0:
        return None, None, COLOURS[background]
    colour = int(np.argmax(inside))
    ys, xs = largest_component(index == colour)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    shape = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))
    return COLOURS[colour], shape, COLOURS[background]
