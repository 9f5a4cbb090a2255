"""What every model version file (a checkpoint, or its ONNX export) says about itself, in plain types: the format
this code reads, the kinds of network, and the vocabularies its heads predict (workers.ml.checkpoint writes them)."""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 1
KINDS = ("fashionnet", "baseline")


@dataclass(frozen=True)
class LabelSpace:
    """Vocabularies shared by a dataset and the network trained on it (stored in checkpoints)."""

    categories: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    num_landmarks: int = 0

    def to_dict(self) -> dict:
        return {
            "categories": list(self.categories),
            "attributes": list(self.attributes),
            "num_landmarks": self.num_landmarks,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LabelSpace:
        return cls(tuple(data["categories"]), tuple(data["attributes"]), int(data["num_landmarks"]))
