"""The Celery application, wired the way Celery's Django guide does it (configuration from CELERY_* settings)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_search.settings")

app = Celery("shop_search")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])
