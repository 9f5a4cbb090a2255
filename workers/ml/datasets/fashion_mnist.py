"""Fashion-MNIST: 70,000 real Zalando product photos (28x28 grey, 10 categories, MIT), from Debian.

Where the files come from: Debian's `dataset-fashion-mnist` package ships the four original idx files
(gzipped) under /usr/share/datasets/fashion-mnist/. `ensure_fashion_mnist()` returns a directory that holds
them, in this order of preference:
1. `<data dir>/fashion-mnist/` — the data dir is `$SHOP_SEARCH_DATA_DIR`, default `var/data/` in the repo;
2. `/usr/share/datasets/fashion-mnist/` — if the package is installed system-wide;
3. otherwise it runs `apt-get download dataset-fashion-mnist` and `dpkg-deb -x` (no root needed) and copies
   the idx files into (1). If that fails, `FashionMnistUnavailable` says what to run by hand.

Splits are kept strictly apart: `train` (60,000) is for training, `t10k` (10,000) for evaluation and demo
catalogs only. A Record's instance_id is its index within the split (each photo is its own product;
positives for metric learning are shopper views of it), category is the Fashion-MNIST class, and
`extra["mask"]` marks the product (every pixel not connected to the black border), so augmentation can put
a cluttered background behind it.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from workers.ml.augment import grow_from_border
from workers.ml.datasets.debian import PackageUnavailable, package_files
from workers.ml.records import LabelSpace, Record

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
LABEL_SPACE = LabelSpace(categories=CLASSES)
SPLITS = ("train", "t10k")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
PACKAGE_SUBDIR = Path("usr/share/datasets/fashion-mnist")  # where the idx files sit inside the .deb
SYSTEM_DIR = Path("/") / PACKAGE_SUBDIR  # the same place when the package is installed with apt-get install
BACKGROUND_LEVEL = 8  # grey values at or below this, connected to the border, are the black studio backdrop
MASK_CHUNK = 2048  # masks are computed on first access, this many images at a time (vectorised, ~0.15 s)
IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMnistUnavailable(PackageUnavailable):
    """The idx files are not on this machine and could not be fetched from Debian."""


def idx_file_names(split: str) -> tuple[str, str]:
    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use one of {SPLITS}")
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _complete(directory: Path) -> bool:
    return all(_find(directory, name) for split in SPLITS for name in idx_file_names(split))


def ensure_fashion_mnist(root: Path | None = None) -> Path:
    """A directory holding the four idx files, fetching the Debian package into `root` if needed."""
    try:
        return package_files(
            package=DEBIAN_PACKAGE,
            subdir=PACKAGE_SUBDIR,
            name="fashion-mnist",
            complete=_complete,
            wanted=lambda path: "idx" in path.name,
            root=root,
        )
    except PackageUnavailable as error:
        raise FashionMnistUnavailable(str(error)) from error


# --------------------------------------------------------------------------------------------- idx files


def read_idx(path: Path | str) -> np.ndarray:
    """Read an idx file (optionally gzipped): 2 zero bytes, a type code, the number of dims, big-endian
    uint32 sizes, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file")
    dims = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=dims, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = data[4 + 4 * dims :]
    if len(payload) != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but has {len(payload)} bytes")
    return np.frombuffer(payload, dtype).reshape(shape)


@dataclass(frozen=True)
class FashionMnistArrays:
    images: np.ndarray  # (N, 28, 28) uint8, white product on black
    labels: np.ndarray  # (N,) uint8 class index into CLASSES


def load_arrays(split: str, root: Path | None = None) -> FashionMnistArrays:
    """The raw arrays of one split; `root` is a directory with the idx files (default: ensure_fashion_mnist())."""
    directory = Path(root) if root is not None else ensure_fashion_mnist()
    image_name, label_name = idx_file_names(split)
    image_path, label_path = _find(directory, image_name), _find(directory, label_name)
    if image_path is None or label_path is None:
        raise FileNotFoundError(f"no {image_name}[.gz] / {label_name}[.gz] in {directory}")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    return FashionMnistArrays(images=images, labels=labels)


def product_masks(images: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: the product = everything except dark pixels connected to the image border.

    Dark parts inside the product (a black stripe) stay in, unlike a plain threshold.
    """
    return ~grow_from_border(images <= BACKGROUND_LEVEL)


def on_white(pixels: np.ndarray, mask: np.ndarray, size: int) -> tuple[Image.Image, Image.Image]:
    """A Fashion-MNIST photo the way a shop takes it: the product on white, `size` px; and its "L" mask.

    The files store the product light on black; a shop photographs it on white. Only the backdrop changes: the
    product keeps its own grey levels (a dark coat stays dark)."""
    product = Image.fromarray(pixels).convert("RGB")
    soft_mask = Image.fromarray(mask.astype(np.uint8) * 255)
    if product.size != (size, size):
        product = product.resize((size, size), Image.Resampling.BICUBIC)
        soft_mask = soft_mask.resize((size, size), Image.Resampling.BILINEAR)
    return Image.composite(product, Image.new("RGB", (size, size), "white"), soft_mask), soft_mask


class FashionMnist(Sequence[Record]):
    """One split as a sequence of Records (built on access; the arrays stay in memory)."""

    label_space = LABEL_SPACE

    def __init__(self, split: str = "t10k", root: Path | None = None, limit: int | None = None) -> None:
        arrays = load_arrays(split, root)
        self.split = split
        self.images = arrays.images[:limit]
        self.labels = arrays.labels[:limit]
        self._mask_chunks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        # On white, the way shops photograph products (and the way the demo and the benchmark show them): a network
        # trained on the files' black backdrop ranked the right product first for 3% of shop-style photos.
        image, mask = on_white(self.images[index], self.mask(index), size=self.images.shape[1])
        return Record(
            image=image,
            instance_id=index,
            category=int(self.labels[index]),
            extra={"source": "fashion-mnist", "split": self.split, "index": index, "mask": mask},
        )

    @property
    def instance_ids(self) -> np.ndarray:
        return np.arange(len(self))

    def mask(self, index: int) -> np.ndarray:
        """(28, 28) bool product mask of image `index`."""
        chunk, offset = divmod(index, MASK_CHUNK)
        if chunk not in self._mask_chunks:
            self._mask_chunks[chunk] = product_masks(self.images[chunk * MASK_CHUNK : (chunk + 1) * MASK_CHUNK])
        return self._mask_chunks[chunk][offset]


def load_records(split: str, root: Path | None = None, limit: int | None = None) -> FashionMnist:
    """Records of a split (`train` or `t10k`), fetching the Debian package on first use."""
    return FashionMnist(split, root, limit)
