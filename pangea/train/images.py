"""Image folders: `ROOT/<class>/<image>` (and `ROOT/train/...` with `ROOT/val/...` or `ROOT/test/...`
for an evaluation split), classes in name order as torchvision's `ImageFolder` numbers them, decoded
with Pillow (torchvision is not needed: it does not import beside this torch build).

The built-in transform is the usual one for training a classifier from images: a random resized
crop (a random area of 35-100% of the image at an aspect ratio of 3/4 to 4/3, resized to
`--image-size`) and a horizontal flip half the time, drawn from the sample's keyed generator; an
evaluation image is resized so that its shorter side is `--image-size` and cropped at the center.
Both give (3, size, size) uint8, which travels as uint8 (a quarter of float32's bytes) and reaches
the model as float32 in [0, 1], normalized with `--normalize` (`pangea.train.inputs`).

A user's own `--transform` gets the sample as {"x": a PIL image, "y": its class} and may call
`random_resized_crop`, `flip` and `center_crop` below.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pangea.errors import DataError

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff"})
_SCALE = (0.35, 1.0)  # of the image's area; torchvision's 0.08 is for 224-pixel ImageNet crops
_RATIO = (3 / 4, 4 / 3)


class ImageFolder:
    """`root/<class>/<file>`: sample i is {"x": the image (PIL), "y": its class's index}.

    The file list is kept compact (the paths under each class folder in one numpy array of bytes:
    ~60 bytes an image, where a list of Path objects took ~425): every process that opens the
    folder holds it, the preprocessor's data workers included."""

    deterministic = True  # reading an image draws nothing

    def __init__(self, root: Path, classes: list[str] | None = None) -> None:
        self.root = root
        self.classes = classes or sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        names, labels = [], []
        for label, name in enumerate(self.classes):
            folder = root / name
            found = sorted(
                str(path.relative_to(root)).encode()
                for path in (folder.rglob("*") if folder.is_dir() else ())
                if path.suffix.lower() in EXTENSIONS
            )
            names += found
            labels += [label] * len(found)
        if not names:
            raise DataError(f"{root}: no images ({', '.join(sorted(EXTENSIONS))}) in its class folders")
        self._names = np.array(names)  # fixed-width bytes: one buffer, not a Python object per image
        self._labels = np.array(labels, np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        path = self.root / self._names[i].decode()
        try:
            with Image.open(path) as image:
                image.load()
                return {"x": image.convert("RGB"), "y": self._labels[i]}
        except OSError as exc:
            raise DataError(f"{path}: not an image Pillow can read ({exc})") from None

    def largest(self, column: str) -> int:
        """The largest class index."""
        return int(self._labels.max())


def folder_splits(root: Path) -> tuple[ImageFolder, ImageFolder | None]:
    """`root/train` with `root/val` or `root/test` if there are, else `root` itself (no evaluation)."""
    if (root / "train").is_dir():
        train = ImageFolder(root / "train")
        held = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
        return train, ImageFolder(held, train.classes) if held else None
    return ImageFolder(root), None


class ImageTransform:
    """The built-in transform: random resized crop and flip (training), resize and center crop
    (evaluation, rng None); (3, size, size) uint8 out."""

    rng_only = True  # draws from its rng alone: no global generator to seed around it

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: dict, rng: np.random.Generator | None) -> dict:
        image = sample["x"]
        if rng is None:
            image = center_crop(image, self.size)
        else:
            image = flip(random_resized_crop(image, self.size, rng), rng)
        return {**sample, "x": to_array(image)}


def random_resized_crop(image, size: int, rng: np.random.Generator, scale=_SCALE, ratio=_RATIO):
    """A random box of `scale` of the area at an aspect ratio in `ratio` (log-uniform), resized to
    size x size; the whole image, center-cropped to a square, when ten draws find no box that fits."""
    from PIL import Image

    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return center_crop(image, size)


def flip(image, rng: np.random.Generator):
    """Mirrored left to right half the time."""
    from PIL import Image

    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def center_crop(image, size: int):
    """The largest centered square, resized to size x size."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def to_array(image) -> np.ndarray:
    """A PIL image as (channels, height, width) uint8."""
    array = np.asarray(image, np.uint8)
    return array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy()
