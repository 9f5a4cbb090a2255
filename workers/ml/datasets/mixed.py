"""Several datasets trained as one: a shop's catalog with procedurally rendered products mixed in.

A shop's catalog has no landmark labels (and its own category and attribute names), so a network trained on it
alone has nothing to teach its landmark branch, and landmark pooling would pool wherever an untrained branch
points. Rendered products carry landmarks, visibility, categories and attributes; mixed into the catalog they
keep every head trained (`factory.build_dataset`, catalog-export's `mix_rendered`).

`MixedRecords(parts)`: every part's records in turn, in one label space and one instance-id space:
- the label space's categories and attributes are the first part's vocabulary, then each further part's names
  not seen yet, so the first part's class indices are unchanged (the shop's labels, the per-epoch check's
  gallery); a name two parts share is one class;
- a record's attributes are re-expressed in the merged vocabulary, NaN where its part does not label that
  attribute (collate masks them one by one); a part without attribute labels stays without;
- landmarks need one layout: parts have the same number of landmarks or none;
- instance ids are offset per part, so no two parts share a product;
- a part may stay outside the metric space (`metric_parts`): its records keep their labels for the other heads
  but the metric losses leave them out (Record.metric). A shop's retrain mixes its rendered products in so:
  batch-hard mining among procedural renders taught the shop's metric space to tell renders apart and measured
  worse on the shop's own golden set (docs/architecture.md, "Retraining").
Batches then mix the parts in proportion to their products (the P x K sampler draws products at random).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from workers.ml.datasets.torch_dataset import instance_ids
from workers.ml.records import LabelSpace, Record


def merged_label_space(spaces: Sequence[LabelSpace]) -> LabelSpace:
    """The first space's names, then the others' new ones; one landmark layout (or none) among them."""
    layouts = {space.num_landmarks for space in spaces} - {0}
    if len(layouts) > 1:
        raise ValueError(f"cannot mix landmark layouts of {sorted(layouts)} points")
    categories = list(dict.fromkeys(name for space in spaces for name in space.categories))
    attributes = list(dict.fromkeys(name for space in spaces for name in space.attributes))
    return LabelSpace(tuple(categories), tuple(attributes), layouts.pop() if layouts else 0)


class MixedRecords(Sequence[Record]):
    """The records of every (records, label space) part in turn, in their merged label space."""

    def __init__(
        self, parts: Sequence[tuple[Sequence[Record], LabelSpace]], metric_parts: Sequence[bool] | None = None
    ) -> None:
        if not parts:
            raise ValueError("nothing to mix")
        self._metric = list(metric_parts) if metric_parts is not None else [True] * len(parts)
        if len(self._metric) != len(parts):
            raise ValueError("metric_parts needs one flag per part")
        self.parts = [records for records, _ in parts]
        self.label_space = merged_label_space([space for _, space in parts])
        self._starts = np.cumsum([0, *(len(records) for records in self.parts)])
        category_index = {name: i for i, name in enumerate(self.label_space.categories)}
        attribute_index = {name: i for i, name in enumerate(self.label_space.attributes)}
        self._categories = [np.array([category_index[n] for n in space.categories], np.int64) for _, space in parts]
        self._attributes = [np.array([attribute_index[n] for n in space.attributes], np.int64) for _, space in parts]
        ids, offset = [], 0
        self._offsets = []
        self.metric_products = 0  # distinct products in the parts inside the metric space
        for records, metric in zip(self.parts, self._metric, strict=True):
            part_ids = instance_ids(records)
            self._offsets.append(offset)
            ids.append(part_ids + offset)
            offset += int(part_ids.max()) + 1 if len(part_ids) else 0
            self.metric_products += len(np.unique(part_ids[part_ids >= 0])) if metric else 0
        self._ids = np.concatenate(ids)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = self.part_of(index)
        record = self.parts[part][index - int(self._starts[part])]
        attributes = None
        if record.attributes is not None:
            attributes = np.full(len(self.label_space.attributes), np.nan, np.float32)
            attributes[self._attributes[part]] = record.attributes
        return replace(
            record,
            instance_id=record.instance_id + self._offsets[part] if record.instance_id >= 0 else -1,
            category=int(self._categories[part][record.category]) if record.category >= 0 else -1,
            attributes=attributes,
            metric=record.metric and self._metric[part],
        )

    @property
    def instance_ids(self) -> np.ndarray:
        return self._ids

    def part_of(self, index: int) -> int:
        """Which part record `index` comes from."""
        return int(np.searchsorted(self._starts, index, side="right")) - 1
