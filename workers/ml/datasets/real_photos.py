"""Real photographs for evaluation only: OpenCV's sample pictures, from Debian's `opencv-doc` package.

Two uses, both held out from every training recipe (no training code imports this module; a test checks it):
- `real_photo_pairs()`: real *second photographs* of one object or scene, taken from another position or in
  other light: the object photographed on its own is the catalog photo, the second photograph is the shopper's
  query. The box of biscuits photographed alone and then lying among other groceries is the hardest.
- `background_photos()`: real photos of surfaces and scenes (a room, fruit, a building, a painting) that the
  held-out query generator (`workers.ml.heldout_queries`) puts behind products. Training draws its
  backgrounds procedurally (`workers.ml.augment`) and never sees these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workers.ml.datasets.debian import package_files

DEBIAN_PACKAGE = "opencv-doc"
PACKAGE_SUBDIR = Path("usr/share/doc/opencv-doc/examples/data")


@dataclass(frozen=True)
class RealPair:
    name: str
    catalog_file: str  # the object photographed on its own: goes into the catalog
    query_file: str  # a second photograph of the same object: the shopper's query
    what: str


PAIRS: tuple[RealPair, ...] = (
    RealPair("box", "box.png", "box_in_scene.png", "a boxed product alone, then among other groceries, turned"),
    RealPair("graffiti", "graf1.png", "graf3.png", "a painted wall, from 40 degrees to the side"),
    RealPair("aerial", "aero1.jpg", "aero3.jpg", "a town from the air, from another position and height"),
    RealPair("street", "leuvenA.jpg", "leuvenB.jpg", "a street, from a few steps further on"),
    RealPair("toys", "rubberwhale1.png", "rubberwhale2.png", "toys on a table, a moment later"),
    RealPair("basketball", "basketball1.png", "basketball2.png", "a player with a ball, a moment later"),
)
BACKGROUND_FILES: tuple[str, ...] = (
    "building.jpg",
    "fruits.jpg",
    "home.jpg",
    "board.jpg",
    "stuff.jpg",
    "starry_night.jpg",
    "orange.jpg",
    "apple.jpg",
    "smarties.png",
    "butterfly.jpg",
)
WANTED = frozenset(name for pair in PAIRS for name in (pair.catalog_file, pair.query_file)) | set(BACKGROUND_FILES)


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in WANTED)


def ensure_opencv_samples(root: Path | None = None) -> Path:
    """A directory holding the pictures above, fetched from Debian's opencv-doc (~96 MB .deb) when missing."""
    return package_files(
        package=DEBIAN_PACKAGE,
        subdir=PACKAGE_SUBDIR,
        name="opencv-samples",
        complete=_complete,
        wanted=lambda path: path.name in WANTED,
        root=root,
    )


def _open(directory: Path, name: str) -> Image.Image:
    with Image.open(directory / name) as image:
        return image.convert("RGB")


def real_photo_pairs(directory: Path | None = None) -> list[tuple[RealPair, Image.Image, Image.Image]]:
    """(pair, catalog photo, query photo) for every pair, as RGB images."""
    directory = directory or ensure_opencv_samples()
    return [(pair, _open(directory, pair.catalog_file), _open(directory, pair.query_file)) for pair in PAIRS]


def background_photos(directory: Path | None = None) -> list[Image.Image]:
    directory = directory or ensure_opencv_samples()
    return [_open(directory, name) for name in BACKGROUND_FILES]
