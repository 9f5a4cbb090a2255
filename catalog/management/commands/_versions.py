"""What the model-version commands share (a leading underscore: Django does not take this for a command)."""

from __future__ import annotations

from django.core.management.base import CommandError

from catalog.models import ModelVersion
from catalog.services import golden


def version_named(name_or_id: str) -> ModelVersion:
    """A version by name, or by id."""
    version = ModelVersion.objects.filter(name=name_or_id).first()
    if version is None and name_or_id.isdigit():
        version = ModelVersion.objects.filter(pk=int(name_or_id)).first()
    if version is None:
        raise CommandError(f"no model version named {name_or_id!r}")
    return version


def golden_side_by_side(versions: list[ModelVersion]) -> str:
    """The versions' golden-set numbers as a plain-text table (overall, then per source and per shop)."""
    numbers = [golden.version_golden(v) or {} for v in versions]
    sections: list[tuple[str, list[dict]]] = [("all queries", numbers)]
    for group, label in (("by_source", "source"), ("by_shop", "shop")):
        keys = sorted({key for n in numbers for key in (n.get(group) or {})})
        sections += [(f"{label} {key}", [(n.get(group) or {}).get(key) or {} for n in numbers]) for key in keys]
    width = max(14, *(len(v.name) + 2 for v in versions))
    lines = [f"{'':24}" + "".join(f"{v.name:>{width}}" for v in versions)]
    for title, values in sections:
        lines.append(title)
        for key, label, pattern in golden.GOLDEN_NUMBERS:
            cells = "".join(f"{(pattern.format(v[key]) if key in v else '-'):>{width}}" for v in values)
            lines.append(f"  {label:22}{cells}")
    return "\n".join(lines)
