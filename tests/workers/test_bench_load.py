"""bench_load's report: what counts as an error, how busy answers are kept apart, and the latency per phase (the
load run itself is a benchmark, run by hand: `manage.py bench_load`)."""

from workers.management.commands.bench_load import Events, Sample, multipart, render_markdown, summarise


def _samples() -> list[Sample]:
    before = [
        Sample(at_s=t, latency_s=0.1 * (1 + t % 3), status=200, timings_ms={"encode": 80.0 + t}) for t in range(10)
    ]
    during = [Sample(at_s=10 + t, latency_s=0.2, status=200, timings_ms={"encode": 90.0}) for t in range(10)]
    busy = [Sample(at_s=12.5, latency_s=0.001, status=503), Sample(at_s=13.5, latency_s=0.001, status=503)]
    return before + during + busy


def test_busy_answers_are_counted_apart_from_errors_and_phases_split_at_the_events():
    events = Events(import_posted=10.0, import_done=15.0, switch_started=10.0, switch_active=None)
    report = summarise(_samples(), events, duration_s=20.0)

    assert (report["requests"], report["answered"], report["busy_503"], report["errors"]) == (22, 20, 2, 0)
    assert report["phases"]["before the import and the switch"]["searches"] == 10
    assert report["phases"]["while the import ran"]["searches"] == 5  # 10..15 s
    assert report["phases"]["while the switch ran (fit, index)"]["searches"] == 10  # never active: to the end
    assert report["phases"]["while the import ran"]["p50_ms"] == 200.0
    assert report["server_stage_median_ms"] == {"encode": 89.5}  # 80..89 and ten 90s
    assert report["throughput_per_s"] == 1.0


def test_anything_but_200_and_503_is_an_error_and_shows_in_the_markdown():
    samples = [*_samples(), Sample(at_s=19.0, latency_s=60.0, status=0), Sample(at_s=19.5, latency_s=0.1, status=500)]
    report = summarise(samples, Events(), duration_s=20.0)
    assert report["errors"] == 2 and report["error_statuses"] == [0, 500]
    config = {"products": 10, "shoppers": 2, "duration_s": 20.0, "cpus": 2, "workers": {"search": 2},
              "web": {"server": "gunicorn", "processes": 2, "threads": 4}, "search_max_concurrent_per_web_process": 3,
              "warm_up_s": 1.0}  # fmt: skip
    text = render_markdown({**report, "config": config, "events": Events().__dict__})
    assert "| 24 | 20 | 2 | 2 |" in text


def test_the_multipart_body_carries_the_photo_byte_for_byte():
    body, content_type = multipart({"k": "5"}, {"image": ("p.jpg", b"\xff\xd8binary\r\n--", "image/jpeg")})
    boundary = content_type.split("boundary=")[1]
    assert body.count(f"--{boundary}".encode()) == 3 and b"\xff\xd8binary\r\n--\r\n" in body
    assert b'name="k"\r\n\r\n5\r\n' in body
