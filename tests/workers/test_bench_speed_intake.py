"""`manage.py bench_speed --only intake` runs both intake paths on its photos and writes the table (no database)."""

import json

from django.core.management import call_command


def test_the_intake_section_times_both_paths_on_every_photo(tmp_path, capsys):
    out = tmp_path / "speed.json"
    call_command("bench_speed", only="intake", intake_repeats=2, out=out)

    rows = json.loads(out.read_text())["intake"]
    assert [row["photo"] for row in rows] == [
        "JPEG 4032x3024", "JPEG 2016x1512", "JPEG 816x612", "PNG 1200x1200 RGBA"
    ]  # fmt: skip
    for row in rows:
        assert row["before_ms"]["p50"] > 0 and row["after_ms"]["p50"] > 0 and row["decode_alone_ms"]["p50"] > 0
    assert "| JPEG 4032x3024 |" in out.with_suffix(".md").read_text()
