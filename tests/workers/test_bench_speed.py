"""bench_speed's table from measured parts: bench_search's codes-only coarse measurement (no database) and the
markdown the README quotes."""

from __future__ import annotations

from catalog.management.commands.bench_search import _coarse_only
from workers.management.commands.bench_speed import markdown


def test_the_coarse_selection_is_measured_next_to_its_floor_and_tabled():
    entry = _coarse_only(size=20_000, code_bits=256, fc7_dim=16, seed=0, queries=20)
    floor = entry["backends"]["memory"]["coarse_floor"]
    assert floor["read_codes_once_ms"] > 0 and floor["selection_ms"] > 0 and floor["faiss_flat_ms"] > 0
    assert floor["selection_to_floor"] == round(floor["selection_ms"] / floor["read_codes_once_ms"], 2)
    assert entry["backends"]["memory"]["memory_mb"] > 20_000 * 32 / 1e6  # the codes at least

    table = markdown(
        {
            "cpus": 2,
            "search": {"sizes": [entry]},
            "encode": [
                {"model": "version 0 (224 px)", "batch1_ms": {"torch": 20.0, "onnxruntime": 8.0},
                 "batch32_images_per_s": {"torch": 60.0, "onnxruntime": 150.0}},
            ],
            "ingest": {"products": 100, "workers": 1, "images_per_s": 50.0, "images_per_worker_cpu_s": 90.0},
            "api": {"concurrency_1": {"statuses": {"200": 10, "503": 2}, "answers_per_s": 5.0,
                                      "client_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                                      "server_ms": {"total": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}},
                    "new_product_searchable_s": 0.5},
        }
    )  # fmt: skip
    assert "| 20,000 (codes only) |" in table
    assert f"{floor['selection_to_floor']:.2f}x" in table
    assert "| version 0 (224 px) | 20.0 ms | 8.0 ms | 60 images/s | 150 images/s |" in table
    assert "searchable 0.5 s after" in table
    assert "| concurrency 1 | 5.0 | 2 of 12 | 1.0 / 2.0 / 3.0 ms | 1.0 / 2.0 / 3.0 ms |" in table


def test_the_fine_stage_and_the_api_floors_are_tabled():
    fine = {"fine_ms": 0.4, "fine_to_floor": 1.33, "floor_in_memory_ms": 0.3, "fine_1000_ms": 0.6,
            "fine_1000_to_floor": 1.2, "fine_cards_read_ms": 2.5, "fine_in_postgresql_ms": 5.0,
            "change_log_poll_ms": 0.5}  # fmt: skip
    coarse = {"read_codes_once_ms": 1.0, "selection_ms": 1.4, "selection_to_floor": 1.4, "selection_to_faiss": 0.8,
              "full_scan_ms": 3.0, "full_scan_to_floor": 3.0, "faiss_flat_ms": 1.8}  # fmt: skip
    floors = {"index_rows": 1_000_000, "floor_ms_p50": {"encode": 10.0, "coarse": 1.0, "fine": 0.3},
              "stage_over_floor_p50": {"encode": 1.1, "coarse": 1.6, "fine": 1.5}, "intake_ms_p50": 3.0,
              "floors_plus_intake_ms": 14.3, "total_over_floors_plus_intake": 1.25}  # fmt: skip
    table = markdown(
        {
            "search": {"sizes": [{"products": 1_000_000, "backends": {"memory": {
                "coarse_floor": coarse, "fine_floor": fine, "memory_mb": 569, "load_s": 9.0, "recall_at_10": 0.99,
                "total_ms": {"p50": 5.0, "p99": 9.0}}}}]},
            "api": {"fields": {"verify": "false"}, "concurrency_1": {
                "statuses": {"200": 10}, "answers_per_s": 5.0, "client_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                "server_ms": {"total": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}, "floors": floors}},
        }
    )  # fmt: skip
    assert "| 0.400 ms (1.33x) | 0.300 ms | 0.600 ms (1.20x) | 2.50 ms | 5.00 ms | 0.50 ms |" in table
    assert "**1.25x** the floors + intake (14.3 ms: intake 3.0, encode floor 10.0" in table
    assert "1,000,000 codes); stage / floor: encode 1.1x, coarse 1.6x, fine 1.5x." in table


def test_the_ingest_ratio_and_the_index_load_are_tabled():
    table = markdown(
        {
            "ingest": {"products": 100, "workers": 1, "images_per_s": 40.0, "images_per_worker_cpu_s": 44.0,
                       "model_images_per_s": 50.0, "model_images_per_cpu_s": 55.0,
                       "ingest_per_worker_process_to_model": 0.8, "ingest_per_worker_cpu_s_to_model": 0.88,
                       "profile_ms_per_image": {"encode_network": 20.0, "keypoints_sift_and_write": 4.5}},
            "load": {"sizes": [{"products": 1_000_000, "index_mb": 569.0, "load_s": 9.5,
                                "load_and_write_snapshot_s": 10.2, "snapshot_load_s": 0.61, "rss_before_mb": 121.0,
                                "rss_after_mb": 700.0, "rss_peak_mb": 740.0, "snapshot_rss_after_mb": 699.0,
                                "snapshot_rss_peak_mb": 701.0}]},
        }
    )  # fmt: skip
    assert "the model alone, same run (batch 64, one thread): 50.0 images/s (55.0 per CPU second)" in table
    assert "per worker process = 0.8x and per worker CPU second = 0.88x" in table
    assert "| | 20.00 | 4.50 |" in table
    assert "| 1,000,000 products | 569 MB | 9.50 s | 10.20 s | 0.61 s | 121 / 700 / 740 MB | 699 / 701 MB |" in table
