"""`manage.py demo_catalog`: the sample shop. Loads >= 1,000 products (Fashion-MNIST photos and rendered products,
several photos each) through the services, makes sure a model version will serve (version 0 is fitted by the
worker if none exists) and waits until everything is embedded. Idempotent: a second run adds nothing."""

from __future__ import annotations

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from tqdm import tqdm

from catalog.models import ImageEmbedding, Merchant, ModelVersion, Product, ProductImage
from catalog.services import model_versions
from catalog.services.products import image_add, product_upsert
from workers import sample_shop

WRITE_BATCH = 50  # products per transaction: commits (and embed tasks) in batches, progress stays visible
POLL_S = 1.0  # how often the wait loop looks at the worker's progress
WORKER_PING_TIMEOUT_S = 2.0


class Command(BaseCommand):
    help = "Load the sample shop (Fashion-MNIST + rendered products) and wait until the worker has embedded it."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--products", type=int, default=1000)
        parser.add_argument("--fashion-mnist-dir", type=Path, default=None, help="directory with the idx files")
        parser.add_argument("--no-wait", action="store_true", help="do not wait for the worker to embed")
        parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the worker")

    def handle(self, *args, products: int, fashion_mnist_dir: Path | None, no_wait: bool, timeout: float, **options):
        started = time.monotonic()
        catalog, note = sample_shop.sample_products(count=products, fashion_mnist_dir=fashion_mnist_dir)
        if "unavailable" in note:
            self.stderr.write(self.style.WARNING(note))
        merchants = {
            slug: Merchant.objects.get_or_create(slug=slug, defaults={"name": name})[0]
            for slug, name in (sample_shop.FASHION_MERCHANT, sample_shop.RENDER_MERCHANT)
        }
        complete = self._complete_skus()
        todo = [item for item in catalog if (item.merchant_slug, item.sku) not in complete]
        added_products = added_images = 0
        progress = tqdm(total=len(todo), desc="sample products", unit="product", disable=not todo)
        for start in range(0, len(todo), WRITE_BATCH):
            with transaction.atomic():
                for item in todo[start : start + WRITE_BATCH]:
                    result = product_upsert(
                        merchant=merchants[item.merchant_slug],
                        sku=item.sku,
                        title=item.title,
                        category=item.category,
                        attributes=item.attributes,
                        price=item.price,
                    )
                    added_products += result.created
                    for position, photo in enumerate(item.photos()):
                        added_images += image_add(product=result.product, data=photo, position=position).created
                    progress.update(1)
        progress.close()
        self.stdout.write(
            f"sample shop: {note}; added {added_products} products and {added_images} images "
            f"({len(catalog) - len(todo)} already there)"
        )
        with transaction.atomic():
            version = model_versions.model_version_bootstrap()
        if not no_wait:
            self._wait(version_id=version.pk, timeout=timeout)
        self.stdout.write(self.style.SUCCESS(f"sample shop ready in {time.monotonic() - started:.0f} s"))

    def _complete_skus(self) -> set[tuple[str, str]]:
        """Products already loaded: a second run neither renders nor re-adds them. A product and its photos are
        written in one transaction, so a product that exists has all of them (identical photos count once)."""
        slugs = [sample_shop.FASHION_MERCHANT[0], sample_shop.RENDER_MERCHANT[0]]
        return set(Product.objects.filter(merchant__slug__in=slugs).values_list("merchant__slug", "sku"))

    def _wait(self, *, version_id: int, timeout: float) -> None:
        from shop_search.celery import app

        if not (app.control.ping(timeout=WORKER_PING_TIMEOUT_S) or []):
            self.stderr.write(self.style.WARNING("no Celery worker answers; `manage.py demo` starts one"))
        deadline = time.monotonic() + timeout
        total = ProductImage.objects.exclude(status=ProductImage.Status.FAILED).count()
        bar = tqdm(total=total, desc="embedding (fitting version 0 first)", unit="image", mininterval=POLL_S)
        while True:
            version = ModelVersion.objects.get(pk=version_id)
            if version.status == ModelVersion.Status.FAILED:
                bar.close()
                raise CommandError(f"model version {version.name} failed: {version.metrics.get('error', '?')}")
            done = ImageEmbedding.objects.filter(model_version_id=version_id).count()
            total = ProductImage.objects.exclude(status=ProductImage.Status.FAILED).count()
            bar.total = total
            bar.set_description(f"embedding with {version.name} ({version.status})")
            bar.update(done - bar.n)
            if version.status == ModelVersion.Status.ACTIVE and done >= total:
                bar.close()
                return
            if time.monotonic() > deadline:
                bar.close()
                raise CommandError(f"the worker had embedded {done} of {total} images after {timeout:.0f} s")
            time.sleep(POLL_S)
