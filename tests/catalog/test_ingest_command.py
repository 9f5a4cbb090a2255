"""`manage.py import_catalog`: the same import from the command line, with a progress bar and a summary."""

import io

import pytest
from django.core.management import CommandError, call_command

from catalog.models import ImportJob, Product
from tests.catalog.ingest_helpers import catalog

pytestmark = pytest.mark.django_db


def test_import_catalog_inline_reports_counts_and_rejected_lines(tmp_path):
    manifest, archive = catalog(4)
    (tmp_path / "catalog.csv").write_bytes(manifest + b"X,,dress,1,\n")
    (tmp_path / "images.zip").write_bytes(archive)
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "import_catalog", str(tmp_path / "catalog.csv"), images=str(tmp_path / "images.zip"), merchant="cli-shop",
        create_merchant=True, inline=True, chunk_rows=2, stdout=out, stderr=err,
    )  # fmt: skip
    text = out.getvalue()
    assert "4 ok, 1 rejected of 5" in text and "line 6: X: title is required" in text
    assert "import" in err.getvalue() and "5/5" in err.getvalue()  # the tqdm bar
    assert Product.objects.filter(merchant__slug="cli-shop").count() == 4
    assert ImportJob.objects.get().state == "done"


def test_import_catalog_refuses_unknown_merchants_and_bad_files(tmp_path):
    (tmp_path / "catalog.csv").write_bytes(b"sku,title\nA,a\n")
    with pytest.raises(CommandError, match="no merchant"):
        call_command("import_catalog", str(tmp_path / "catalog.csv"), merchant="nobody")
    (tmp_path / "bad.csv").write_bytes(b"name\nA\n")
    with pytest.raises(CommandError, match="no sku"):
        call_command("import_catalog", str(tmp_path / "bad.csv"), merchant="nobody", create_merchant=True)
    assert ImportJob.objects.count() == 0
