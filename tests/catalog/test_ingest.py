"""Catalog import: manifests with good and bad rows, idempotent re-upload, image changes, exactly-once chunks."""

import io
from decimal import Decimal

import pytest

from catalog import selectors
from catalog.intake import IntakeError
from catalog.models import ImportChunk, ImportJob, Product, ProductImage
from catalog.services import imports, maintenance, products
from tests import factories
from tests.catalog.ingest_helpers import catalog, csv_bytes, jsonl_bytes, picture, rejected, run_inline, zip_bytes
from tests.catalog.other_transaction import OtherTransaction
from workers import tasks

pytestmark = pytest.mark.django_db


def _create(merchant, manifest: bytes, archive: bytes | None = None, **kwargs) -> ImportJob:
    return imports.import_job_create(
        merchant=merchant,
        manifest=manifest,
        manifest_name=kwargs.pop("name", "catalog.csv"),
        archive=io.BytesIO(archive) if archive is not None else None,
        **kwargs,
    )


def test_good_rows_land_and_malformed_rows_are_rejected_with_line_numbers():
    merchant = factories.merchant()
    manifest = (
        b"sku,title,category,attributes,price,images\n"
        b"A1,Red dress,dress,red|long,19.90,a.png\n"  # line 2: good
        b",No sku,dress,,5,\n"  # line 3: missing sku
        b"A3,Bad price,dress,,cheap,\n"  # line 4: price
        b'A4,"Multi\nline title",bag,,7,b.png\n'  # lines 5-6: good (quoted newline)
        b"A1,Again,dress,,1,\n"  # line 7: duplicate sku
        b"A8,Missing image,dress,,1,nope.png\n"  # line 8: image not in the zip
        b"A9,Broken image,dress,,1,broken.png\n"  # line 9: not an image
        b"A10,Too,many,fields,1,x,y\n"  # line 10: field count
    )
    archive = zip_bytes({"a.png": picture(1), "b.png": picture(2), "broken.png": b"not an image at all"})
    job = run_inline(_create(merchant, manifest, archive, chunk_rows=2))

    assert (job.state, job.total, job.processed, job.ok, job.rejected) == ("done", 8, 8, 2, 6)
    lines = {error["line"]: error for error in rejected(job)}
    assert sorted(lines) == [3, 4, 7, 8, 9, 10]
    assert "sku is required" in lines[3]["error"]
    assert "price" in lines[4]["error"] and lines[4]["sku"] == "A3"
    assert "already appears on line 2" in lines[7]["error"]
    assert "nope.png" in lines[8]["error"]
    assert "broken.png" in lines[9]["error"] and "not an image" in lines[9]["error"]
    assert "fields" in lines[10]["error"]
    # The rejected image row left nothing behind: no product, no image.
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["A1", "A4"]
    dress = Product.objects.get(sku="A1")
    assert dress.attributes == ["long", "red"] and dress.price == Decimal("19.90")
    assert Product.objects.get(sku="A4").title == "Multi\nline title"
    assert ProductImage.objects.count() == 2 and job.images_new == 2
    assert job.archive.name == ""  # the upload is released once every chunk has read it


def test_jsonl_manifest_rows_and_errors():
    merchant = factories.merchant()
    manifest = (
        jsonl_bytes([{"sku": "J1", "title": "Bag", "attributes": ["leather"], "price": 30, "images": ["j1.png"]}])
        + b"{not json}\n\n"
        + jsonl_bytes([["a list"], {"sku": "J2", "title": "Shoe", "active": "no", "price": -1}])
        + jsonl_bytes([{"sku": "J3", "title": "Shoe", "active": False}])
    )
    job = run_inline(_create(merchant, manifest, zip_bytes({"j1.png": picture(5)}), name="catalog.jsonl"))
    assert job.manifest_format == "jsonl"
    assert (job.total, job.ok, job.rejected) == (5, 2, 3)
    assert [error["line"] for error in rejected(job)] == [2, 4, 5]
    assert "JSON" in rejected(job)[0]["error"] and "price" in rejected(job)[2]["error"]
    assert Product.objects.get(sku="J3").active is False


def test_a_deeply_nested_or_unstorable_jsonl_row_is_that_rows_error_not_the_uploads():
    from catalog.intake.manifests import manifest_parse

    manifest = (
        b'{"sku": "N1", "title": "t", "attributes": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"
        b'{"sku": "N2", "title": "NUL \\u0000 inside"}\n'
        b'{"sku": "N3\\u0000", "title": "t"}\n'
        b'{"sku": "N4", "title": "t", "attributes": ["\\ud800"]}\n'
        b'{"sku": "OK", "title": "fine"}\n'
    )
    parsed = manifest_parse(manifest, filename="catalog.jsonl")
    assert [row.sku for row in parsed.rows] == ["OK"]
    assert [(error.line, error.sku, error.error) for error in parsed.errors] == [
        (1, "", "not valid JSON: nested too deeply"),  # (a line it cannot parse names no sku)
        (2, "N2", "title must not contain NUL characters"),
        (3, "N3", "sku must not contain NUL characters"),  # named without the NUL: the error is stored in JSONB
        (4, "N4", "attributes is not valid Unicode text"),
    ]


def test_the_same_upload_twice_changes_nothing_and_stores_no_new_image(django_capture_on_commit_callbacks):
    merchant = factories.merchant()
    manifest, archive = catalog(5)
    first = run_inline(_create(merchant, manifest, archive))
    assert (first.ok, first.images_new) == (5, 5)
    before = {
        "products": list(Product.objects.values_list("id", "sku", "title", "updated_at")),
        "images": list(ProductImage.objects.values_list("id", "sha256", "file")),
    }
    with django_capture_on_commit_callbacks() as callbacks:
        second = imports.import_job_create(merchant=merchant, manifest=manifest, archive=io.BytesIO(archive))
        run_inline(second)
    second.refresh_from_db()
    assert (second.ok, second.rejected, second.images_new) == (5, 0, 0)
    assert list(Product.objects.values_list("id", "sku", "title", "updated_at")) == before["products"]
    assert list(ProductImage.objects.values_list("id", "sha256", "file")) == before["images"]
    # After commit: the chunk task and the release of the uploaded zip; no embedding task for unchanged images.
    assert len(callbacks) == second.chunks_total + 1


def test_a_changed_image_replaces_the_old_one_and_data_changes_update():
    merchant = factories.merchant()
    rows = [{"sku": "S1", "title": "Coat", "images": "s1.png"}]
    run_inline(_create(merchant, csv_bytes(rows), zip_bytes({"s1.png": picture(1)})))
    old = ProductImage.objects.get()
    rows = [{"sku": "S1", "title": "Warm coat", "images": "s1.png"}]
    job = run_inline(_create(merchant, csv_bytes(rows), zip_bytes({"s1.png": picture(2)})))
    new = ProductImage.objects.get()
    assert new.pk != old.pk and new.status == "pending" and job.images_new == 1
    assert Product.objects.get().title == "Warm coat"


def test_a_chunk_runs_exactly_once():
    merchant = factories.merchant()
    manifest, archive = catalog(3)
    job = _create(merchant, manifest, archive, chunk_rows=2)
    chunk = ImportChunk.objects.get(job=job, index=0)
    first = imports.import_run_chunk(chunk_id=chunk.pk)
    again = imports.import_run_chunk(chunk_id=chunk.pk)  # a re-delivered task
    assert not first.already_done and again.already_done
    job.refresh_from_db()
    assert (job.processed, job.ok, job.chunks_done, job.state) == (2, 2, 1, "running")
    run_inline(job)
    job.refresh_from_db()
    assert (job.processed, job.ok, job.chunks_done, job.state) == (3, 3, 2, "done")


def test_file_level_problems_raise_and_store_nothing():
    merchant = factories.merchant()
    for manifest, message in [
        (b"", "empty"),
        (b"name,price\nx,1\n", "no sku"),
        (b"\xff\xfe\x00bad", "UTF-8"),
        (b"sku,title\n", "no rows"),
    ]:
        with pytest.raises(IntakeError, match=message):
            _create(merchant, manifest)
    assert ImportJob.objects.count() == 0


def test_rows_without_a_zip_are_rejected_but_rows_without_images_land():
    merchant = factories.merchant()
    job = run_inline(
        _create(merchant, csv_bytes([{"sku": "A", "title": "a", "images": "a.png"}, {"sku": "B", "title": "b"}]))
    )
    assert (job.ok, job.rejected) == (1, 1)
    assert "no zip" in rejected(job)[0]["error"]


@pytest.mark.django_db(transaction=True)
def test_an_import_meeting_a_concurrent_uncommitted_writer_of_the_same_skus_waits_and_writes_each_row_once():
    """Another writer has inserted the same skus and not committed yet: the chunk's insert waits for that commit,
    leaves those rows alone (ON CONFLICT DO NOTHING), then locks and updates them. No unique-constraint error, no
    second path."""
    merchant = factories.merchant()
    manifest, archive = catalog(3)
    job = _create(merchant, manifest, archive)
    stale = {f"SKU-{i}": products.product_values(title="written elsewhere") for i in range(3)}
    with OtherTransaction(lambda: products.products_upsert(merchant=merchant, values=stale)) as other:
        other.commit(after_s=0.5)  # while the chunk below waits on its insert
        job = run_inline(job)
    assert (job.ok, job.rejected, job.images_new) == (3, 0, 3)
    assert sorted(Product.objects.values_list("title", flat=True)) == ["Product 0", "Product 1", "Product 2"]
    assert ProductImage.objects.count() == 3


def test_progress_has_a_rate_and_eta_while_running_and_resume_requeues_only_unfinished_chunks(
    django_capture_on_commit_callbacks,
):
    merchant = factories.merchant()
    manifest, archive = catalog(6)
    job = _create(merchant, manifest, archive, chunk_rows=2)
    imports.import_run_chunk(chunk_id=job.chunks.get(index=0).pk)
    job.refresh_from_db()
    progress = selectors.import_job_progress(job=job)
    assert (progress.processed, progress.total, progress.percent) == (2, 6, 33.3)
    assert progress.rows_per_second and progress.eta_seconds is not None and progress.eta_seconds >= 0
    assert progress.images_pending == 2  # stored, waiting for the embed queue
    with django_capture_on_commit_callbacks() as callbacks:
        assert imports.import_job_resume(job=job) == 2
    assert len(callbacks) == 2


def test_a_chunk_that_keeps_failing_is_rejected_with_the_reason_and_the_job_finishes(monkeypatch):
    merchant = factories.merchant()
    manifest, archive = catalog(4)
    job = _create(merchant, manifest, archive, chunk_rows=2)
    first, second = job.chunks.order_by("index")
    imports.import_run_chunk(chunk_id=first.pk)
    assert tasks.import_run_chunk.apply(args=[10**9]).get() == {"chunk_id": 10**9, "missing": True}

    def broken(*, chunk_id):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(imports, "import_run_chunk", broken)
    result = tasks.import_run_chunk.apply(args=[second.pk])  # runs here, retries included
    assert result.failed()
    job.refresh_from_db()
    assert (job.state, job.processed, job.ok, job.rejected) == ("done", 4, 2, 2)
    assert [error["line"] for error in rejected(job)] == [4, 5] and "disk on fire" in rejected(job)[0]["error"]
    assert imports.import_chunk_fail(chunk_id=second.pk, error="again") is False


def test_media_sweep_deletes_only_old_unreferenced_files(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path  # its own media: other test processes' files are unreferenced from here
    product = factories.product(factories.merchant())
    kept = products.image_add(product=product, data=picture(1), enqueue=False).image
    storage = kept.file.storage
    orphan = storage.save("products/orphan-test/left-by-a-killed-worker.png", io.BytesIO(picture(2)))
    assert maintenance.media_orphans_delete(min_age_s=3600) == 0  # too young: may still be committed
    assert maintenance.media_orphans_delete(min_age_s=0) == 1
    assert not storage.exists(orphan) and storage.exists(kept.file.name)
