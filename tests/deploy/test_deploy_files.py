"""deploy/ is consistent with the code: there is no Docker engine here, so the files are checked, not run."""

import re
from pathlib import Path

import yaml
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def settings_env_names() -> set[str]:
    """Every environment variable the settings read (settings.py and the embedded-services module)."""
    source = (ROOT / "shop_search/settings.py").read_text() + (ROOT / "shop_search/embedded.py").read_text()
    return set(re.findall(r"""(?:environ\.get|env_bool|env_list)\(\s*["']([A-Z_]+)["']""", source))


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_has_the_stack_on_pgvector_and_redis():
    services = compose()["services"]
    assert set(services) == {"db", "redis", "web", "worker", "beat"}
    assert services["db"]["image"] == "pgvector/pgvector:pg17"
    assert services["redis"]["image"].startswith("redis:7")
    assert "gunicorn" in services["web"]["command"] and "shop_search.wsgi:application" in services["web"]["command"]
    assert "migrate" in services["web"]["command"]


def test_compose_environment_names_are_read_by_the_settings():
    known = settings_env_names()
    for name in ("web", "worker", "beat"):
        environment = compose()["services"][name]["environment"]
        assert set(environment) <= known, set(environment) - known
    db = compose()["services"]["db"]["environment"]
    url = compose()["services"]["web"]["environment"]["DATABASE_URL"]
    assert f"{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}@db:5432/{db['POSTGRES_DB']}" in url


def test_env_example_names_are_read_by_the_settings():
    names = set()
    for line in (DEPLOY / "env.example").read_text().splitlines():
        match = re.match(r"#?\s*([A-Z_]+)=", line)
        if match:
            names.add(match.group(1))
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS", "DEBUG"} <= names
    assert names <= settings_env_names(), names - settings_env_names()


def test_worker_consumes_every_queue_tasks_are_routed_to():
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()} | {settings.CELERY_TASK_DEFAULT_QUEUE}
    command = compose()["services"]["worker"]["command"]
    queues = set(re.search(r"-Q\s+(\S+)", command).group(1).split(","))
    assert routed <= queues
    assert "-A shop_search" in command


def test_procfile_runs_the_same_commands_as_compose():
    procfile = dict(line.split(":", 1) for line in (DEPLOY / "Procfile").read_text().splitlines() if line.strip())
    services = compose()["services"]
    assert procfile["worker"].strip() == services["worker"]["command"]
    assert procfile["beat"].strip() == services["beat"]["command"]
    assert procfile["web"].strip() in services["web"]["command"]
    assert (DEPLOY / "gunicorn.conf.py").exists()
