"""Settings for the worker processes of the kill-9 import test: the test settings, plus a short Redis visibility
timeout so that the task a killed worker held unacknowledged is handed to the next worker within seconds (in
production it is an hour: a restarted worker gets the message back then)."""

from tests.settings import *  # noqa: F403

CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 4,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
