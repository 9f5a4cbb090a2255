"""Command line: measure a checkpoint's retrieval on a data set's catalog and shopper-photo queries.

    python -m workers.ml.evaluate --checkpoint var/models/x.pt --dataset fashion-mnist --out var/eval.json

Prints (and with --out writes) the JSON report of workers.ml.evaluation.evaluate_encoder: R@k and mAP for exact
fc7, Hamming and the cascade, coarse-stage recall, bit balance and the heads' metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from workers.ml.datasets.factory import EVALUATION_DATASETS, evaluation_sets
from workers.ml.encoder import Encoder
from workers.ml.evaluation import CASCADE_MAX_CANDIDATES, CASCADE_MIN_CANDIDATES, evaluate_encoder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--dataset", required=True, help=" | ".join(EVALUATION_DATASETS))
    parser.add_argument("--data-root", help="where the user's DeepFashion data is (deepfashion-inshop)")
    parser.add_argument("--catalog-size", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cascade-min", type=int, default=CASCADE_MIN_CANDIDATES)
    parser.add_argument("--cascade-max", type=int, default=CASCADE_MAX_CANDIDATES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    encoder = Encoder.load(args.checkpoint, num_threads=args.threads)
    sets = evaluation_sets(
        args.dataset,
        catalog_size=args.catalog_size,
        num_queries=args.queries,
        seed=args.seed,
        root=args.data_root,
    )
    report = evaluate_encoder(
        encoder, sets.catalog, sets.queries, cascade_min=args.cascade_min, cascade_max=args.cascade_max
    )
    report["dataset"] = args.dataset
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
