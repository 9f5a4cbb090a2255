"""Anonymous routes stay cheap: the token route is throttled, throttles key IPv6 clients by /64, and the public
search API offers no expensive choices."""

import itertools

import pytest
from django.urls import reverse
from rest_framework.request import Request
from rest_framework.test import APIClient

from catalog.api.throttling import ClientScopedRateThrottle, client_key

_addresses = itertools.count(1)


def _client_address() -> str:
    return f"10.45.{next(_addresses) % 250}.{(next(_addresses) * 7) % 250 + 1}"


@pytest.mark.django_db
def test_wrong_passwords_on_the_token_route_get_429_after_a_few_tries(settings, django_user_model):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "auth": "5/min"},
    }
    django_user_model.objects.create_user("guessed", password="the-right-one")
    attacker = APIClient(REMOTE_ADDR=_client_address())
    url = reverse("api:auth-token")

    codes = [attacker.post(url, {"username": "guessed", "password": f"guess-{i}"}).status_code for i in range(8)]

    assert codes == [400] * 5 + [429] * 3
    response = attacker.post(url, {"username": "guessed", "password": "the-right-one"})
    assert response.status_code == 429 and "throttled" in response.json()["detail"].lower()
    assert int(response["Retry-After"]) > 0
    # another client is not affected, and the right password still gets the token
    other = APIClient(REMOTE_ADDR=_client_address())
    assert other.post(url, {"username": "guessed", "password": "the-right-one"}).json()["token"]


def test_the_default_token_rate_comes_from_the_environment():
    import subprocess
    import sys

    code = (
        "import os, django\n"
        "os.environ['AUTH_THROTTLE_RATE'] = '3/hour'\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.settings')\n"
        "django.setup()\n"
        "from django.conf import settings\n"
        "print(settings.REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']['auth'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "3/hour"


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("not-an-address", "not-an-address"),
        ("", ""),
    ],
)
def test_throttles_key_ipv6_clients_by_their_64(address, key):
    assert client_key(address) == key


def test_throttle_identity_uses_the_64_of_a_forwarded_ipv6_client_through_one_proxy(rf, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    request = Request(
        rf.get("/api/search", HTTP_X_FORWARDED_FOR="203.0.113.9, 2001:db8:5:6::42", REMOTE_ADDR="172.18.0.5")
    )
    assert ClientScopedRateThrottle().get_ident(request) == "2001:db8:5:6::/64"


@pytest.mark.django_db
def test_an_api_path_that_matches_no_route_gets_the_apis_json_404_and_a_page_the_html_one(client):
    response = client.get("/api/products/-5/similar")  # `<int:...>` takes no sign: no route matches
    assert response.status_code == 404 and response.json() == {"detail": "Not found."}
    page = client.get("/no-such-page/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")
