from django.apps import AppConfig


class WorkersConfig(AppConfig):
    """The worker side as a Django app: its management commands (the sample shop, the encode and ingest
    benchmarks) need the network or its data sets, which the catalog app never imports."""

    name = "workers"
    verbose_name = "Workers: embedding, query encoding, training"
