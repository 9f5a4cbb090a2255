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
    assert {"db", "redis", "web", "proxy", "beat"} <= set(services)
    assert services["db"]["image"] == "pgvector/pgvector:pg17"
    assert services["redis"]["image"].startswith("redis:7")
    assert "gunicorn" in services["web"]["command"] and "shop_search.wsgi:application" in services["web"]["command"]
    assert "migrate" in services["web"]["command"]


def test_compose_environment_names_are_read_by_the_settings():
    known = settings_env_names()
    for name in ("web", *worker_services(), "beat"):
        environment = compose()["services"][name]["environment"]
        assert set(environment) <= known, set(environment) - known
    db = compose()["services"]["db"]["environment"]
    url = compose()["services"]["web"]["environment"]["DATABASE_URL"]
    assert f"{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}@db:5432/{db['POSTGRES_DB']}" in url


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        match = re.match(r"(#?)\s*([A-Z_]+)=(.*)", line)
        if match and not match.group(1):
            values[match.group(2)] = match.group(3).strip()
        elif match:
            values.setdefault(match.group(2), "")
    return values


def caddyfile() -> str:
    return (DEPLOY / "Caddyfile").read_text()


def proxy_env_names() -> set[str]:
    """The variables the Caddyfile reads ({$NAME})."""
    return set(re.findall(r"\{\$([A-Z_]+)", caddyfile()))


def test_env_example_names_are_read_by_the_settings():
    names = set(env_example())
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS", "DEBUG"} <= names
    known = settings_env_names() | proxy_env_names()
    assert names <= known, names - known


def test_only_the_proxy_is_published_so_one_forwarded_for_hop_is_trusted():
    """A published gunicorn port would let a client send its own X-Forwarded-For straight to the web, and with
    NUM_PROXIES=1 every forged value would be a new throttle identity."""
    services = compose()["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}
    assert "ports" not in services["web"] and "8000" in [str(port) for port in services["web"].get("expose", [])]
    assert services["proxy"]["image"].startswith("caddy:")
    # the proxy forwards to gunicorn's port, and it is the only hop: NUM_PROXIES in env.example is exactly 1
    assert re.search(r"reverse_proxy\s+web:8000\b", caddyfile())
    bind = re.search(r'"GUNICORN_BIND",\s*"[^"]*:(\d+)"', (DEPLOY / "gunicorn.conf.py").read_text())
    assert bind and bind.group(1) == "8000"
    assert env_example()["NUM_PROXIES"] == str(len(published)) == "1"
    # Caddy replaces an untrusted client's X-Forwarded-For; trusting upstream proxies would pass forged hops on
    assert "trusted_proxies" not in caddyfile()
    # the proxy sees only the variables its Caddyfile reads, never the app's .env (SECRET_KEY)
    assert "env_file" not in services["proxy"] and set(services["proxy"]["environment"]) == proxy_env_names()
    assert proxy_env_names() <= set(env_example())


def test_a_forged_forwarded_for_behind_the_proxy_does_not_change_the_throttle_identity(rf, settings):
    from rest_framework.request import Request

    from catalog.api.throttling import ClientScopedRateThrottle

    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": int(env_example()["NUM_PROXIES"])}
    identities = {
        ClientScopedRateThrottle().get_ident(
            # what gunicorn receives when a proxy appends the address it saw to whatever the client sent
            Request(rf.get("/api/search", HTTP_X_FORWARDED_FOR=f"{forged}, 198.51.100.7", REMOTE_ADDR="172.18.0.9"))
        )
        for forged in ("203.0.113.1", "203.0.113.2", "10.0.0.1")
    }
    assert identities == {"198.51.100.7"}


def worker_services() -> dict[str, set[str]]:
    """Every compose service that runs a Celery worker, with the queues it consumes."""
    workers = {}
    for name, service in compose()["services"].items():
        command = service.get("command", "")
        if isinstance(command, str) and re.search(r"celery .*\bworker\b", command):
            assert "-A shop_search" in command, name
            workers[name] = set(re.search(r"-Q\s+(\S+)", command).group(1).split(","))
    return workers


def test_workers_consume_every_queue_tasks_are_routed_to():
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()} | {settings.CELERY_TASK_DEFAULT_QUEUE}
    consumed = set().union(*worker_services().values())
    assert routed <= consumed, routed - consumed


def test_shoppers_queries_have_their_own_workers():
    """Imports, indexing and training never take a search worker, and a search worker takes nothing else."""
    workers = worker_services()
    assert [name for name, queues in workers.items() if "search" in queues] == ["worker-search"]
    assert workers["worker-search"] == {"search"}
    assert workers["worker-embed"] == {"embed"}
    node_names = [re.search(r"-n\s+(\S+)", compose()["services"][name]["command"]) for name in workers]
    assert all(node_names) and len({match.group(1) for match in node_names}) == len(workers)  # unique on one host


def test_procfile_runs_the_same_commands_as_compose():
    procfile = dict(line.split(":", 1) for line in (DEPLOY / "Procfile").read_text().splitlines() if line.strip())
    services = compose()["services"]
    for name in worker_services():
        assert procfile[name].strip() == services[name]["command"], name
    assert procfile["beat"].strip() == services["beat"]["command"]
    assert procfile["web"].strip() in services["web"]["command"]
    assert (DEPLOY / "gunicorn.conf.py").exists()
