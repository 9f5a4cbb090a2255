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


def golden_per_category(versions: list[ModelVersion]) -> str:
    """The versions' R@1 / R@10 per category of the product sought, as the admin's compare page shows them."""
    rows = golden.golden_by_category(versions)
    if not rows:
        return "per category: not measured (evaluate the versions again)"
    width = max(16, *(len(v.name) + 4 for v in versions))
    header = "".join(f"{f'{v.name} {label}':>{width}}" for v in versions for _, label in golden.CATEGORY_NUMBERS)
    lines = [f"{'per category':24}{'queries':>8}{header}"]
    for row in rows:
        cells = "".join(
            f"{('-' if n[key] is None else f'{n[key]:.1%}'):>{width}}"
            for n in row.numbers
            for key, _ in golden.CATEGORY_NUMBERS
        )
        lines.append(f"  {row.category[:22]:22}{row.queries:>8}{cells}")
    return "\n".join(lines)


def recent_overlap_line(candidate: ModelVersion) -> str:
    """The candidate's top-10 overlap with the active version on the recent-query sample, as one line."""
    overlap = (golden.version_golden(candidate) or {}).get("recent_overlap")
    if not overlap:
        return "recent shopper queries: no sample to compare on (kept only where a shop allows it)"
    return (
        f"recent shopper queries ({overlap['queries']}): {overlap['overlap10']:.1%} of {overlap['against']}'s top 10 "
        f"also in {candidate.name}'s; same first result {overlap['same_top1']:.1%}"
    )
