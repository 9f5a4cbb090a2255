"""Readers for two DeepFashion benchmarks, if the user has the data (it cannot be downloaded here).

Both use whitespace-separated list files: line 1 = number of rows, line 2 = column names, then one row per
image. Files are looked up in `root`, `root/Anno` and `root/Eval`; images in `root/Img/<image_name>` or
`root/<image_name>` (image names start with "img/").

In-shop Clothes Retrieval Benchmark (`DeepFashionInShop`):
    list_eval_partition.txt   image_name item_id evaluation_status      (train | query | gallery)
    list_bbox_inshop.txt      image_name clothes_type pose_type x_1 y_1 x_2 y_2
    list_landmarks_inshop.txt image_name clothes_type variation_type [landmark_visibility_i x_i y_i]...
    list_attr_cloth.txt       attribute_name                            (optional, with the next one)
    list_attr_items.txt       item_id attribute_labels...               (1 = yes; -1 or 0 = no/unknown)
  instance_id = the item number (id_00000123 -> 123); category = the folder pair, e.g. "WOMEN/Dresses";
  attributes are per item, and None when the attribute files are absent.

Category and Attribute Prediction Benchmark (`DeepFashionCategoryAttribute`):
    list_category_cloth.txt   category_name category_type               (50 categories)
    list_category_img.txt     image_name category_label                 (1-based index into the above)
    list_attr_cloth.txt       attribute_name attribute_type             (names may contain spaces)
    list_attr_img.txt         image_name attribute_labels...            (1 = yes; -1 or 0 = no/unknown)
    list_bbox.txt             image_name x_1 y_1 x_2 y_2
    list_landmarks.txt        image_name clothes_type variation_type [landmark_visibility_i x_i y_i]...
    list_eval_partition.txt   image_name evaluation_status              (train | val | test)
  It has no product identity, so each image is its own instance (instance_id = its row in the partition);
  metric-learning positives then come from shopper-view augmentation.

Landmarks: clothes_type 1 (upper body) lists 6 points, 2 (lower body) 4, 3 (full body) 8; they are placed in
the shared 8-slot layout (collar, sleeve, waistline, hem; left then right), missing slots get visibility 0.
Visibility flag 0 = visible -> 1; 1 (occluded) and 2 (cut off) -> 0. Pixel coordinates are normalised by
the image (or the bounding box when `crop_to_bbox`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from workers.ml.records import LabelSpace, Record

NUM_LANDMARKS = 8
# Slots of the 8-slot layout that each clothes type's listed landmarks fill, in listing order.
SLOTS_BY_CLOTHES_TYPE: dict[int, tuple[int, ...]] = {
    1: (0, 1, 2, 3, 6, 7),  # upper body: collar, sleeve, hem
    2: (4, 5, 6, 7),  # lower body: waistline, hem
    3: (0, 1, 2, 3, 4, 5, 6, 7),  # full body: all
}
LIST_DIRS = (".", "Anno", "Eval", "Anno_fine", "Anno_coarse")


@dataclass(frozen=True)
class ListFile:
    """A DeepFashion list file: declared row count, column names, and the rows split on whitespace."""

    count: int
    columns: tuple[str, ...]
    rows: list[list[str]]


def read_list_file(path: Path) -> ListFile:
    with path.open(encoding="utf-8") as file:
        lines = [line for line in file.read().splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path}: needs a count line and a column-name line")
    count = int(lines[0].split()[0])
    rows = [line.split() for line in lines[2:]]
    if len(rows) != count:
        raise ValueError(f"{path}: header says {count} rows, found {len(rows)}")
    return ListFile(count, tuple(lines[1].split()), rows)


def find_optional_list_file(root: Path, name: str) -> Path | None:
    for directory in LIST_DIRS:
        candidate = root / directory / name
        if candidate.is_file():
            return candidate
    return None


def find_list_file(root: Path, name: str) -> Path:
    path = find_optional_list_file(root, name)
    if path is None:
        raise FileNotFoundError(f"{name} not found in {root} (nor its {', '.join(LIST_DIRS[1:])} folders)")
    return path


def image_path(root: Path, image_name: str) -> Path:
    for candidate in (root / "Img" / image_name, root / image_name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"image {image_name} not found under {root}/Img or {root}")


@dataclass(frozen=True)
class LandmarkEntry:
    """Landmarks of one image in the 8-slot layout, in pixels of the original image."""

    points: np.ndarray  # (8, 2) float32
    visibility: np.ndarray  # (8,) float32


def parse_landmark_row(row: list[str]) -> LandmarkEntry:
    """`image_name clothes_type variation_type` then (visibility, x, y) per listed landmark."""
    clothes_type = int(row[1])
    slots = SLOTS_BY_CLOTHES_TYPE[clothes_type]
    values = row[3:]
    if len(values) < 3 * len(slots):
        raise ValueError(f"{row[0]}: clothes type {clothes_type} needs {len(slots)} landmarks, got {values}")
    points = np.zeros((NUM_LANDMARKS, 2), np.float32)
    visibility = np.zeros(NUM_LANDMARKS, np.float32)
    for i, slot in enumerate(slots):
        flag, x, y = values[3 * i : 3 * i + 3]
        points[slot] = (float(x), float(y))
        visibility[slot] = 1.0 if int(flag) == 0 else 0.0
    return LandmarkEntry(points, visibility)


def attribute_name(row: list[str]) -> str:
    """A list_attr_cloth.txt row: the name (may contain spaces), then a type number in Category-Attribute."""
    return " ".join(row[:-1] if len(row) > 1 and row[-1].isdigit() else row)


def multi_hot(labels: list[str], names: Sequence[str], label_space: LabelSpace) -> np.ndarray:
    """Attribute labels in file order (1 = positive) -> multi-hot over `label_space.attributes`."""
    if len(labels) != len(names):
        raise ValueError(f"{len(labels)} attribute labels for {len(names)} attribute names")
    index = {name: i for i, name in enumerate(label_space.attributes)}
    vector = np.zeros(len(label_space.attributes), np.float32)
    for name, label in zip(names, labels):
        if int(label) == 1 and name in index:
            vector[index[name]] = 1.0
    return vector


def read_landmarks(path: Path | None) -> dict[str, LandmarkEntry]:
    if path is None:
        return {}
    return {row[0]: parse_landmark_row(row) for row in read_list_file(path).rows}


@dataclass(frozen=True)
class _Entry:
    image_name: str
    instance_id: int
    category: int
    bbox: tuple[int, int, int, int] | None  # x1, y1, x2, y2 in pixels
    landmarks: LandmarkEntry | None
    attributes: np.ndarray | None
    split: str


class _DeepFashionDataset(Sequence[Record]):
    label_space: LabelSpace
    entries: list[_Entry]
    root: Path
    crop_to_bbox: bool
    source: str

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        entry = self.entries[index]
        with Image.open(image_path(self.root, entry.image_name)) as file:
            image = file.convert("RGB")
        origin = np.zeros(2, np.float32)
        if self.crop_to_bbox and entry.bbox is not None:
            x1, y1, x2, y2 = entry.bbox
            x1, y1 = max(0, x1), max(0, y1)
            x2, y2 = min(image.width, max(x2, x1 + 1)), min(image.height, max(y2, y1 + 1))
            image = image.crop((x1, y1, x2, y2))
            origin = np.array([x1, y1], np.float32)
        landmarks = visibility = None
        if entry.landmarks is not None:
            visibility = entry.landmarks.visibility.copy()
            landmarks = (entry.landmarks.points - origin) / np.array(image.size, np.float32)
            landmarks[visibility == 0] = np.clip(landmarks[visibility == 0], 0.0, 1.0)
            inside = np.all((landmarks >= 0) & (landmarks < 1), axis=1)
            visibility = visibility * inside  # a crop can cut a landmark off
        extra: dict = {"source": self.source, "image_name": entry.image_name, "split": entry.split}
        if entry.bbox is not None and not self.crop_to_bbox:
            x1, y1, x2, y2 = entry.bbox
            extra["bbox"] = (x1 / image.width, y1 / image.height, x2 / image.width, y2 / image.height)
        return Record(
            image=image,
            instance_id=entry.instance_id,
            category=entry.category,
            attributes=entry.attributes,
            landmarks=landmarks.astype(np.float32) if landmarks is not None else None,
            visibility=visibility,
            extra=extra,
        )

    @property
    def instance_ids(self) -> np.ndarray:
        return np.array([entry.instance_id for entry in self.entries])


class DeepFashionInShop(_DeepFashionDataset):
    """In-shop Clothes Retrieval: `split` is "train", "query", "gallery" or None (all)."""

    source = "deepfashion-inshop"

    def __init__(
        self,
        root: Path | str,
        split: str | None = "train",
        crop_to_bbox: bool = False,
        label_space: LabelSpace | None = None,
    ) -> None:
        self.root, self.crop_to_bbox = Path(root), crop_to_bbox
        partition = read_list_file(find_list_file(self.root, "list_eval_partition.txt"))
        boxes = {
            row[0]: tuple(int(v) for v in row[3:7])
            for row in read_list_file(find_list_file(self.root, "list_bbox_inshop.txt")).rows
        }
        landmarks = read_landmarks(find_optional_list_file(self.root, "list_landmarks_inshop.txt"))
        categories = sorted({self._category_name(row[0]) for row in partition.rows} - {""})
        names_file = find_optional_list_file(self.root, "list_attr_cloth.txt")
        items_file = find_optional_list_file(self.root, "list_attr_items.txt")
        attribute_names = [attribute_name(r) for r in read_list_file(names_file).rows] if names_file else []
        self.label_space = label_space or LabelSpace(tuple(categories), tuple(attribute_names), NUM_LANDMARKS)
        attributes_of = {}
        if names_file and items_file:
            for row in read_list_file(items_file).rows:
                attributes_of[row[0]] = multi_hot(row[1:], attribute_names, self.label_space)
        index = {name: i for i, name in enumerate(self.label_space.categories)}
        self.entries = [
            _Entry(
                image_name=name,
                instance_id=self._item_number(item_id),
                category=index.get(self._category_name(name), -1),
                bbox=boxes.get(name),  # type: ignore[arg-type]
                landmarks=landmarks.get(name),
                attributes=attributes_of.get(item_id),
                split=status,
            )
            for name, item_id, status in (row[:3] for row in partition.rows)
            if split is None or status == split
        ]

    @staticmethod
    def _item_number(item_id: str) -> int:
        digits = re.sub(r"\D", "", item_id)
        if not digits:
            raise ValueError(f"item id {item_id!r} has no number")
        return int(digits)

    @staticmethod
    def _category_name(image_name: str) -> str:
        """img/WOMEN/Dresses/id_00000002/02_1_front.jpg -> WOMEN/Dresses."""
        parts = image_name.split("/")
        return "/".join(parts[1:3]) if len(parts) >= 5 else ""


class DeepFashionCategoryAttribute(_DeepFashionDataset):
    """Category and Attribute Prediction: `split` is "train", "val", "test" or None (all)."""

    source = "deepfashion-category-attribute"

    def __init__(
        self,
        root: Path | str,
        split: str | None = "train",
        crop_to_bbox: bool = True,
        label_space: LabelSpace | None = None,
    ) -> None:
        self.root, self.crop_to_bbox = Path(root), crop_to_bbox
        category_names = [row[0] for row in read_list_file(find_list_file(self.root, "list_category_cloth.txt")).rows]
        attribute_names = [
            attribute_name(row) for row in read_list_file(find_list_file(self.root, "list_attr_cloth.txt")).rows
        ]
        self.label_space = label_space or LabelSpace(tuple(category_names), tuple(attribute_names), NUM_LANDMARKS)
        # The files number categories by their own list; map through names in case label_space differs.
        category_index = {name: i for i, name in enumerate(self.label_space.categories)}
        partition = read_list_file(find_list_file(self.root, "list_eval_partition.txt"))
        wanted = {
            row[0]: (number, row[1]) for number, row in enumerate(partition.rows) if split is None or row[1] == split
        }
        category_of = {
            row[0]: category_index.get(category_names[int(row[1]) - 1], -1)
            for row in read_list_file(find_list_file(self.root, "list_category_img.txt")).rows
            if row[0] in wanted
        }
        attributes_of = {
            row[0]: multi_hot(row[1:], attribute_names, self.label_space)
            for row in read_list_file(find_list_file(self.root, "list_attr_img.txt")).rows
            if row[0] in wanted
        }
        boxes = {
            row[0]: tuple(int(v) for v in row[1:5])
            for row in read_list_file(find_list_file(self.root, "list_bbox.txt")).rows
            if row[0] in wanted
        }
        landmarks = read_landmarks(find_optional_list_file(self.root, "list_landmarks.txt"))
        self.entries = [
            _Entry(
                image_name=name,
                instance_id=number,
                category=category_of.get(name, -1),
                bbox=boxes.get(name),  # type: ignore[arg-type]
                landmarks=landmarks.get(name),
                attributes=attributes_of.get(name),
                split=status,
            )
            for name, (number, status) in wanted.items()
        ]
