"""The compare page (candidate against the active version: the golden set per category, and the top-10 overlap on
recent shopper queries), `manage.py compare_versions` printing the same per-category table, and the recent-query
sample it rests on: kept only where the shops allow it, bounded, and deleted after their retention."""

import io
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from catalog.models import Merchant, ModelVersion, RecentQuery
from catalog.services import golden, maintenance
from tests import factories

pytestmark = pytest.mark.django_db


def _numbers(r1: float, by_category: dict[str, tuple[int, float, float]], **extra) -> dict:
    return {
        "queries": sum(q for q, _, _ in by_category.values()), "r1": r1, "r10": 0.7, "map10": 0.4,
        "calibration_ece": 0.018,
        "by_category": {c: {"queries": q, "r1": a, "r10": b} for c, (q, a, b) in by_category.items()}, **extra,
    }  # fmt: skip


@pytest.fixture
def versions() -> tuple[ModelVersion, ModelVersion]:
    active = ModelVersion.objects.create(name="v0", checkpoint="v0.pt", code_bits=8, status="active")
    candidate = ModelVersion.objects.create(name="run8", checkpoint="run8.pt", code_bits=8, status="ready")
    active = golden.version_golden_record(
        version_id=active.pk, numbers=_numbers(0.30, {"dress": (120, 0.25, 0.60), "shoe": (80, 0.375, 0.70)})
    )
    overlap = {"against": "v0", "against_id": active.pk, "queries": 40, "overlap10": 0.625, "same_top1": 0.55}
    candidate = golden.version_golden_record(
        version_id=candidate.pk,
        numbers=_numbers(
            0.35, {"dress": (120, 0.40, 0.75), "shoe": (80, 0.275, 0.65)}, recent_overlap=overlap, landmark_pck=0.413
        ),
    )
    return candidate, active


def test_golden_by_category_puts_the_versions_side_by_side(versions):
    candidate, active = versions
    rows = golden.golden_by_category([candidate, active])
    assert [(row.category, row.queries) for row in rows] == [("dress", 120), ("shoe", 80)]  # largest first
    assert rows[0].numbers == [{"r1": 0.40, "r10": 0.75}, {"r1": 0.25, "r10": 0.60}]
    assert rows[1].numbers == [{"r1": 0.275, "r10": 0.65}, {"r1": 0.375, "r10": 0.70}]
    unmeasured = ModelVersion.objects.create(name="old", checkpoint="old.pt", code_bits=8, status="retired")
    assert golden.golden_by_category([unmeasured, active])[0].numbers[0] == {"r1": None, "r10": None}


def test_the_compare_page_shows_both_versions_per_category_and_the_overlap_to_staff_only(versions):
    candidate, _ = versions
    url = f"/admin/catalog/modelversion/{candidate.pk}/compare/"
    assert Client().get(url).status_code == 302  # anonymous: to the login
    member = Client()
    member.force_login(get_user_model().objects.create_user("shopper", "s@example.com", "pw"))
    assert member.get(url).status_code == 302  # not staff

    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    response = staff.get(url)

    assert response.status_code == 200
    page = response.content.decode()
    table = page[page.index('id="per-category"') :]
    table = table[: table.index("</table>")]
    assert "run8 (candidate) R@1" in table and "v0 (active) R@10" in table
    dress = table[table.index("<td>dress</td>") :].split("</tr>")[0]
    assert [cell.split("</td>")[0] for cell in dress.split("<td>")[1:]] == [
        "dress", "120", "40.0%", "75.0%", "25.0%", "60.0%"
    ]  # fmt: skip
    assert "62.5%" in page and "55.0%" in page and "40 recent shopper searches" in page  # the overlap
    assert "35.0%" in page and "30.0%" in page  # the overall golden numbers side by side
    assert "calibration ECE" in page and "0.018" in page  # the reliability of the "same product" confidence
    assert "landmark PCK@0.1 (held-out renders)" in page and "41.3%" in page  # the candidate's landmark branch
    listing = staff.get("/admin/catalog/modelversion/").content.decode()
    assert url in listing
    assert staff.get("/admin/catalog/modelversion/999999/compare/").status_code == 403


def test_compare_versions_prints_the_same_per_category_table(versions):
    out = io.StringIO()
    call_command("compare_versions", "run8", stdout=out)
    printed = out.getvalue()
    dress = next(line for line in printed.splitlines() if line.strip().startswith("dress"))
    assert dress.split() == ["dress", "120", "40.0%", "75.0%", "25.0%", "60.0%"]
    assert "run8 R@1" in printed and "v0 R@10" in printed
    assert "62.5% of v0's top 10 also in run8's; same first result 55.0%" in printed


def _merchant(slug: str, *, keeps: bool, retention_days: int = 30) -> Merchant:
    merchant = factories.merchant(slug)
    factories.product(merchant, sku=f"{slug}-1")
    Merchant.objects.filter(pk=merchant.pk).update(
        keep_recent_queries=keeps, shopper_photo_retention_days=retention_days
    )
    merchant.refresh_from_db()
    return merchant


def _keep(merchant: Merchant | None) -> RecentQuery | None:
    return golden.recent_query_keep(
        photo=factories.png_bytes(size=(40, 40)), box=None, merchant_id=merchant.pk if merchant else None
    )


def test_recent_queries_are_kept_only_where_the_shops_allow_it_and_bounded(settings):
    settings.RECENT_QUERY_SAMPLE_RATE = 1.0
    settings.RECENT_QUERIES_MAX = 2
    keeps, refuses = _merchant("keeps", keeps=True), _merchant("refuses", keeps=False)
    assert Merchant._meta.get_field("keep_recent_queries").default is False

    assert _keep(refuses) is None and _keep(None) is None  # a search of all shops: one of them refuses
    first = _keep(keeps)
    assert first is not None and Path(first.photo.path).exists()
    second, third = _keep(keeps), _keep(keeps)
    assert set(RecentQuery.objects.values_list("pk", flat=True)) == {second.pk, third.pk}  # the newest 2
    assert not Path(first.photo.path).exists()  # the oldest went with its file

    settings.RECENT_QUERY_SAMPLE_RATE = 0.0
    assert _keep(keeps) is None and RecentQuery.objects.count() == 2


def test_recent_queries_expire_with_their_shops_retention(settings):
    settings.RECENT_QUERY_SAMPLE_RATE = 1.0
    week, month = _merchant("week", keeps=True, retention_days=7), _merchant("month", keeps=True, retention_days=30)
    aged = {}
    for name, merchant, days in [("week-old", week, 8), ("week-new", week, 6), ("month-mid", month, 8),
                                 ("all-old", None, 8), ("all-new", None, 6)]:  # fmt: skip
        query = _keep(merchant)
        RecentQuery.objects.filter(pk=query.pk).update(created_at=timezone.now() - timedelta(days=days))
        aged[name] = query
    files = {name: Path(query.photo.path) for name, query in aged.items()}

    assert maintenance.shopper_photos_expire() == 2  # a search of all shops follows the strictest (7 days)

    left = {name for name, query in aged.items() if RecentQuery.objects.filter(pk=query.pk).exists()}
    assert left == {"week-new", "month-mid", "all-new"}
    assert {name for name, path in files.items() if path.exists()} == left
    Merchant.objects.filter(pk=month.pk).update(keep_recent_queries=False)  # the shop stops allowing it
    assert maintenance.shopper_photos_expire() == 2  # its sample, and the searches of all shops
    assert set(RecentQuery.objects.values_list("merchant__slug", flat=True)) == {"week"}
