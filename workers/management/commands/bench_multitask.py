"""`manage.py bench_multitask`: does a shop retrain keep its landmark branch trained? With and without rendered
products mixed into the catalog (a run's `mix_rendered`), on the demo shop's catalog.

For each share: the demo shop's products (workers.sample_shop, as `manage.py demo_catalog` loads them) exported
in the retrain's format, trained with the dashboard's defaults (TrainConfig, fresh from the ImageNet backbone: the
first retrain of a shop) on the retrain's data spec (`pipelines.retrain_dataset`), then measured:
- landmark PCK@0.1 of the item box's diagonal on held-out rendered products (`factory.landmark_heldout_views`:
  a seed range no training, demo or benchmark catalog uses), against the same network before training (its
  landmark branch untrained, pooling wherever that points);
- the golden check (`pipelines.golden_epoch_validator`: held-out shopper views of 200 of the shop's products, R@1
  among its main photos), so mixing is seen not to cost the shop's own retrieval;
- both after every epoch too (`per_epoch`);
- training time.
No database: the catalog is exported straight from the sample shop's generator.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Landmark PCK after a demo shop retrain, with and without rendered products mixed in."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--products", type=int, default=1000, help="demo shop products")
        parser.add_argument("--shares", default="0,0.25", help="comma-separated mix_rendered shares to train")
        parser.add_argument("--config", default="{}", help="TrainConfig overrides as JSON (default: the dashboard's)")
        parser.add_argument("--fashion-mnist-dir", type=Path, default=None)
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "multitask.json")

    def handle(self, *args, **options) -> None:
        from workers import pipelines, sample_shop
        from workers.ml.datasets.catalog_export import CatalogExport, CatalogExportWriter

        products, note = sample_shop.sample_products(
            count=options["products"], fashion_mnist_dir=options["fashion_mnist_dir"]
        )
        self.stdout.write(f"demo shop: {note}")
        results = []
        with tempfile.TemporaryDirectory(prefix="bench-multitask-") as workspace:
            export_dir = Path(workspace) / "catalog"
            with CatalogExportWriter(export_dir) as writer:
                for product in products:
                    photos = [(f"{product.sku}-{i}.png", photo) for i, photo in enumerate(product.photos())]
                    writer.add(
                        sku=product.sku,
                        category=product.category,
                        attributes=product.attributes,
                        title=product.title,
                        images=photos,
                    )
            export = CatalogExport(export_dir)
            for share in (float(s) for s in options["shares"].split(",")):
                run_config = {"dataset": {"mix_rendered": share}}
                spec = pipelines.retrain_dataset(run_config, export_dir)
                overrides = {**json.loads(options["config"]), "out_dir": f"{workspace}/run-{share}", "dataset": spec}
                results.append(self._measure(export, overrides))
                self.stdout.write(json.dumps(results[-1]))
        options["out"].parent.mkdir(parents=True, exist_ok=True)
        options["out"].write_text(json.dumps({"products": options["products"], "runs": results}, indent=2))
        self._table(results)

    def _measure(self, export, overrides: dict) -> dict:
        import torch

        from workers import pipelines
        from workers.ml.datasets.factory import build_dataset, landmark_heldout_views
        from workers.ml.encoder import Encoder
        from workers.ml.evaluation import landmark_report
        from workers.ml.model import FashionNet
        from workers.ml.training import TrainConfig, build_model_config, preprocessing_for, read_metrics, train

        config = TrainConfig.from_overrides(overrides)
        data = build_dataset(config.dataset)
        views = landmark_heldout_views()
        model_config = build_model_config(config, data.label_space)
        torch.manual_seed(config.seed)
        untrained = Encoder.from_model(
            FashionNet(model_config), label_space=data.label_space, preprocessing=preprocessing_for(model_config)
        )
        before = landmark_report(untrained, views)
        golden = pipelines.golden_epoch_validator(export, data.label_space)

        def validate(model, prep) -> dict:  # after every epoch: the shop's golden check and the landmark PCK
            report = landmark_report(Encoder.from_model(model, label_space=data.label_space, preprocessing=prep), views)
            shop = golden(model, prep) if golden is not None else {}
            return {**shop, "landmark_pck": report["pck"] if report else None}

        started = time.perf_counter()
        path = train(config, records=data.records, label_space=data.label_space, validate=validate)
        seconds = time.perf_counter() - started
        after = landmark_report(Encoder.load(path), views)
        epochs = read_metrics(config.out_dir)
        last = epochs[-1]
        return {
            "mix_rendered": config.dataset["mix_rendered"],
            "records": len(data.records),
            "epochs": config.epochs,
            "train_seconds": round(seconds, 1),
            "pck_untrained": before["pck"] if before else None,
            "pck_trained": after["pck"] if after else None,
            "pck_landmarks": after["landmarks"] if after else None,
            "golden_r1_cascade": last.get("validation", {}).get("cascade"),
            "golden_r1_fc7": last.get("validation", {}).get("fc7"),
            "last_epoch_losses": {k: round(v, 4) for k, v in last.items() if k in ("loss", "landmarks", "triplet")},
            "per_epoch": [
                {"epoch": m["epoch"], **{k: m["validation"].get(k) for k in ("landmark_pck", "cascade", "fc7")}}
                for m in epochs
            ],
        }

    def _table(self, results: list[dict]) -> None:
        def cell(value) -> str:
            return "n/a (no landmark head)" if value is None else f"{value:.1%}"

        self.stdout.write(
            "| mix_rendered | landmark PCK@0.1, untrained branch | after the retrain | golden R@1 (cascade) "
            "| golden R@1 (fc7) | training s |"
        )
        self.stdout.write("|---|---|---|---|---|---|")
        for r in results:
            self.stdout.write(
                f"| {r['mix_rendered']} | {cell(r['pck_untrained'])} | {cell(r['pck_trained'])} "
                f"| {cell(r['golden_r1_cascade'])} | {cell(r['golden_r1_fc7'])} | {r['train_seconds']} |"
            )
