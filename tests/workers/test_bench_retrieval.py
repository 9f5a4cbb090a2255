"""bench_retrieval's report: per (size, strength, source), mean and spread over seeds, and its markdown table."""

from __future__ import annotations

from catalog.management.bench_database import url_with_path
from workers.management.commands.bench_retrieval import markdown_table, summarise


def _query(rank, *, before=None, coarse=True, category=True, strength="heldout", source="rendered", variants=None):
    ms = {"intake": 1.0, "encode": 10.0, "coarse": 1.0, "fine": 2.0, "verify": 3.0, "explain": 0.5, "total": 6.5}
    return {
        "rank": rank, "rank_before_verify": before if before is not None else rank, "coarse_hit": coarse,
        "candidates": 40, "category_correct": category, "ms": ms, "strength": strength, "source": source,
        "variants": variants or {},
    }  # fmt: skip


def test_summarise_averages_each_metric_over_seeds_per_source():
    runs = [
        {
            "size": 100,
            "seed": 0,
            "products": 100,
            "queries": [_query(1), _query(3, before=5), _query(None, coarse=False)],
        },
        {"size": 100, "seed": 1, "products": 100, "queries": [_query(1), _query(1, before=2), _query(2)]},
        {"size": 100, "seed": 0, "products": 100, "queries": [_query(1, source="real", strength="real photo")]},
    ]
    rows = {(row["source"], row["strength"]): row for row in summarise(runs)}
    rendered = rows[("rendered", "heldout")]
    assert rendered["seeds"] == 2
    assert rendered["R@1"] == {"mean": round((1 / 3 + 2 / 3) / 2, 4), "std": round(1 / 6, 4)}
    assert rendered["R@1_before_verify"]["mean"] == round((1 / 3 + 1 / 3) / 2, 4)
    assert rendered["R@10"]["mean"] == round((2 / 3 + 1) / 2, 4)
    assert rendered["coarse_recall"]["mean"] == round((2 / 3 + 1) / 2, 4)
    assert rendered["coarse_share"]["mean"] == 0.4
    assert rendered["verify_ms_p50"]["mean"] == 3.0
    assert rows[("real", "real photo")]["R@1"]["mean"] == 1.0
    table = markdown_table(
        {"config": {"model": "v0", "split": "test", "seeds": "0,1", "queries": 3}, "results": summarise(runs)}
    )
    assert "| 100 | heldout | rendered | 0.500 ± 0.167 | 0.333 ± 0.000 |" in table
    assert table.count("\n") == 4 + 2


def test_variants_are_summarised_and_tabled_beside_the_recipe():
    runs = [
        {
            "size": 100,
            "seed": 0,
            "products": 100,
            "queries": [
                _query(2, variants={"qe3": 1}),
                _query(None, variants={"qe3": 11}),
                _query(1, variants={"qe3": 1}),
            ],
        }
    ]
    row = summarise(runs)[0]
    assert row["R@1 qe3"]["mean"] == round(2 / 3, 4) and row["R@1"]["mean"] == round(1 / 3, 4)
    assert row["R@10 qe3"]["mean"] == round(2 / 3, 4) and row["R@10"]["mean"] == round(2 / 3, 4)
    config = {"model": "v0", "split": "validation", "seeds": "0", "queries": 3, "variants": {"qe3": {"expansion": 3}}}
    table = markdown_table({"config": config, "results": summarise(runs)})
    assert "| 100 | heldout | rendered | 0.333 / 0.667 | 0.667 / 0.667 |" in table


def test_bench_urls_swap_only_the_database_or_redis_db():
    assert (
        url_with_path("postgresql://postgres:@/shop?host=/var/pg", "/bench")
        == "postgresql://postgres:@/bench?host=/var/pg"
    )
    assert url_with_path("redis://127.0.0.1:6379/0", "/12") == "redis://127.0.0.1:6379/12"


def test_a_bench_command_forwards_its_own_options_to_the_child():
    from catalog.management.bench_database import options_argv

    options = {"sizes": "1000,10000", "category_mode": "off", "keep_database": True}
    assert options_argv(options, ("sizes", "category_mode")) == ["--sizes", "1000,10000", "--category-mode", "off"]
