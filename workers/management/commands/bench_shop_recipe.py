"""`manage.py bench_shop_recipe`: does the dashboard's default retrain beat the shop's version 0 on its own catalog?

In memory, no database: the demo's sample shop (`workers.sample_shop`, `--products` of them) is exported in the
retraining's format (`workers.ml.datasets.catalog_export`), version 0 is fitted on a random sample of its photos as
the shop's is (`workers.ml.baseline.fit_baseline`, 256 bits, fc7 256), and the default TrainConfig (the dashboard's
"Training runs -> Add" with nothing changed, `init_checkpoint` = the active version 0, as the form sets it; `--config`
lays overrides over it to compare recipes) trains on the export with the per-epoch golden check it runs in the
train worker (`workers.pipelines.golden_epoch_validator`: held-out views of the golden set's validation part).

Reported for version 0 and the registered checkpoint, on the golden set's validation part (what the run chose its
checkpoint on) and its test part (views of other products, only reported): R@1 and R@10 through codes then fc7
(`cascade`, workers.ml.evaluation's in-memory cascade) and fc7 alone; with the chosen epoch, seconds per step and
the whole run's time. Writes JSON with `--json`. The real search path's numbers come from `evaluate_version` once
a run is registered (`by_split`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from pathlib import Path

from django.core.management.base import BaseCommand
from PIL import Image

VERSION0_FIT_SAMPLE = 3000  # workers.pipelines.BASELINE_FIT_SAMPLE
MODES = ("cascade", "fc7")


class Command(BaseCommand):
    help = "Version 0 against the default retrain on the demo shop's golden validation and test parts."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--products", type=int, default=1000)
        parser.add_argument("--config", default="{}", help="TrainConfig overrides (JSON) laid over the defaults")
        parser.add_argument("--work-dir", default="", help="keep the export and the run here (default: a temp dir)")
        parser.add_argument("--json", default="", help="write the numbers here")

    def handle(self, *args, **options) -> None:
        if options["work_dir"]:
            Path(options["work_dir"]).mkdir(parents=True, exist_ok=True)
            report = self._run(Path(options["work_dir"]), options)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_shop_recipe-") as work:
                report = self._run(Path(work), options)
        if options["json"]:
            Path(options["json"]).write_text(json.dumps(report, indent=2))
        self.stdout.write(markdown(report))

    def _run(self, work: Path, options: dict) -> dict:
        import numpy as np

        from workers.ml.baseline import fit_baseline
        from workers.ml.checkpoint import load_checkpoint
        from workers.ml.datasets.catalog_export import CatalogExport, CatalogProduct, write_catalog_export
        from workers.ml.datasets.factory import build_dataset, landmark_heldout_views
        from workers.ml.encoder import Encoder
        from workers.ml.evaluation import RetrievalInputs, landmark_report, retrieval_report
        from workers.ml.training import TrainConfig, read_metrics, train
        from workers.pipelines import golden_epoch_sets, golden_epoch_validator, product_key, retrain_dataset
        from workers.sample_shop import sample_products

        started = time.perf_counter()
        export_dir = work / "catalog"
        if not (export_dir / "manifest.jsonl").exists():
            products, note = sample_products(count=options["products"])
            if note:
                self.stderr.write(note)
            write_catalog_export(
                export_dir,
                (
                    CatalogProduct(
                        id=product_key(index // 10_000, f"{p.merchant_slug}-{p.sku}"),
                        images=[Image.open(io.BytesIO(photo)).convert("RGB") for photo in p.photos()],
                        category=p.category,
                        attributes=tuple(p.attributes),
                        title=p.title,
                    )
                    for index, p in enumerate(products)
                ),
            )
        export = CatalogExport(export_dir)
        version0 = work / "version0.pt"
        if not version0.exists():
            chosen = np.random.default_rng(0).choice(len(export), min(VERSION0_FIT_SAMPLE, len(export)), replace=False)
            records = [export[int(i)] for i in chosen]
            names = export.label_space.categories
            fit_baseline(
                [r.image for r in records],
                out_path=version0,
                categories=[names[r.category] if r.category >= 0 else None for r in records],
            )
        sets = golden_epoch_sets(export)
        overrides = json.loads(options["config"])
        config = TrainConfig.from_overrides(
            {"init_checkpoint": str(version0)},
            overrides,
            # the dashboard's data: the catalog with rendered products mixed in (pipelines.retrain_dataset)
            # one run folder per recipe: runs resume from their folder, so two recipes sharing a work dir must not
            {"out_dir": str(work / f"run-{_recipe_key(overrides)}"), "dataset": retrain_dataset(overrides, export_dir)},
        )
        data = build_dataset(config.dataset)
        trained_at = time.perf_counter()
        checkpoint = train(
            config,
            records=data.records,
            label_space=data.label_space,
            validate=golden_epoch_validator(export, data.label_space),
        )
        train_seconds = time.perf_counter() - trained_at
        epochs = read_metrics(config.out_dir)
        epoch_seconds = [m["seconds"] for m in epochs if "seconds" in m]
        report = {
            "products": len(export.products),
            "images": len(export),
            "config": json.loads(options["config"]),
            "train_seconds": round(train_seconds, 1),
            "epoch_seconds": epoch_seconds,
            "epochs": [{"epoch": m["epoch"], **m.get("validation", {})} for m in epochs],
            "selected_epoch": load_checkpoint(checkpoint)["metrics"].get("selected_epoch"),
            "versions": {},
        }
        gallery = sets["validation"][0]  # every split searches the same gallery: encoded once per version
        for name, path in (("version 0", version0), ("retrained", checkpoint)):
            encoder = Encoder.load(path)
            catalog = encoder.encode([r.image for r in gallery])
            catalog_inputs = RetrievalInputs(catalog.fc7, catalog.codes, np.array([r.instance_id for r in gallery]))
            report["versions"][name] = {}
            for split, (_, queries) in sets.items():
                encoded = encoder.encode([r.image for r in queries])
                numbers = retrieval_report(
                    RetrievalInputs(encoded.fc7, encoded.codes, np.array([r.instance_id for r in queries])),
                    catalog_inputs,
                )
                report["versions"][name][split] = {
                    "queries": len(queries),
                    "gallery": len(gallery),
                    **{f"{mode}_{k}": round(numbers[mode][k], 4) for mode in MODES for k in ("R@1", "R@10")},
                }
        # the landmark branch a mixed retrain trains (none without rendered products): PCK on held-out renders
        landmarks = landmark_report(Encoder.load(checkpoint), landmark_heldout_views())
        report["landmark_pck"] = round(landmarks["pck"], 4) if landmarks else None
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report


def markdown(report: dict) -> str:
    lines = [
        f"{report['products']} products ({report['images']} photos); overrides {json.dumps(report['config'])}; "
        f"training {report['train_seconds']:.0f} s (epochs {report['epoch_seconds']} s), selected epoch "
        f"{report['selected_epoch']} (-1 = the start); landmark PCK@0.1 on held-out renders "
        f"{'n/a (no landmark branch)' if report['landmark_pck'] is None else format(report['landmark_pck'], '.3f')}",
        "",
        "| version | split | queries | cascade R@1 | cascade R@10 | fc7 R@1 | fc7 R@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, splits in report["versions"].items():
        for split, n in splits.items():
            lines.append(
                f"| {name} | {split} | {n['queries']} | {n['cascade_R@1']:.3f} | {n['cascade_R@10']:.3f} | "
                f"{n['fc7_R@1']:.3f} | {n['fc7_R@10']:.3f} |"
            )
    lines += ["", "per epoch (validation part): " + json.dumps(report["epochs"])]
    return "\n".join(lines)


def _recipe_key(overrides: dict) -> str:
    """A short stable name for a recipe's overrides."""
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
