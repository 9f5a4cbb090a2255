"""schemathesis over the OpenAPI schema drf-spectacular serves: every operation, anonymous and with a merchant's
token, against a live server of the project. No answer may be a server error (5xx), and every answer whose status
the schema documents must match the schema (body and content type).

Bounded and deterministic: EXAMPLES generated cases per operation and caller (Hypothesis derandomized, no example
database, no shrinking), once with generated path ids (mostly unknown: the 404 paths) and once with the ids of the
merchant's real rows (the 200 paths). The catalog holds an active version with planted embeddings, so the similar
products route answers with real results. A failure is recorded with the request that caused it (curl), and the
test reports them all at the end.
"""

from __future__ import annotations

import io
import uuid

import hypothesis
import numpy as np
import pytest
import schemathesis
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck, Phase
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from catalog.models import DuplicateFinding, ImportJob
from catalog.services import imports
from tests import factories
from tests.catalog import searchkit
from tests.catalog.ingest_helpers import catalog, run_inline

EXAMPLES = 12
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# Deletes run last, so the real rows the other operations use are still there.
METHOD_ORDER = {"get": 0, "post": 1, "patch": 2, "put": 3, "delete": 9}


@pytest.fixture
def shop(settings, tmp_path):
    """A merchant with a token, products (with images and embeddings under the active version), an import with a
    rejected row, and a duplicate finding: every merchant route has something real to show."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.SEARCH_VERIFY = False
    # Throttles answer 429 after a few calls; the schema checks need the real answers of every call. The counters
    # go to a cache prefix of their own: the hundreds of calls from 127.0.0.1 must not throttle the next tests.
    rates = {"search": "100000/min", "auth": "100000/min"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    settings.CACHES = {"default": {**settings.CACHES["default"], "KEY_PREFIX": f"fuzz-{uuid.uuid4().hex}"}}
    merchant = factories.merchant("fuzz")
    user = get_user_model().objects.create_user("fuzz-user", password="pw")
    merchant.users.add(user)
    version = searchkit.active_version()
    rng = np.random.default_rng(0)
    planted = [
        searchkit.product_with_embeddings(
            merchant=merchant,
            version=version,
            sku=f"P-{i}",
            encodings=[(searchkit.random_bits(rng), rng.standard_normal(searchkit.FC7_DIM))],
            category="dress",
            attributes=("red",),
        )
        for i in range(6)
    ]
    first, second = planted[0].embeddings[0], planted[1].embeddings[0]
    DuplicateFinding.objects.create(
        merchant=merchant, image=first.image, other_image=second.image, model_version=version,
        kind="duplicate_listing", hamming=0, fc7_distance=0.0,
    )  # fmt: skip
    manifest, archive = catalog(3)
    job = imports.import_job_create(
        merchant=merchant, manifest=manifest + b"BAD,,dress,1,nowhere.png\n", archive=io.BytesIO(archive)
    )
    run_inline(job)
    assert ImportJob.objects.get(pk=job.pk).rejected == 1
    return {
        "token": Token.objects.create(user=user).key,
        "ids": {"product_id": first.product_id, "image_id": first.image_id, "job_id": job.pk},
    }


def _first_lines(failure: BaseException) -> str:
    """The failure's title, what was wrong and how to reproduce it (schemathesis' full report is pages long)."""
    text = str(failure)
    lines = [line for line in text.splitlines() if line.strip()]
    curl = next((line.strip() for line in lines if line.strip().startswith("curl ")), "")
    return "\n".join([*lines[:4], curl])


def _fuzz(
    operation, mode: GenerationMode, *, base_url: str, headers: dict, path_parameters: dict | None, failures: dict
) -> int:
    """Run EXAMPLES cases of one operation; record (not raise) each distinct failure once. Returns the cases sent."""
    sent = []

    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case) -> None:
        sent.append(case)
        response = case.call(base_url=base_url, headers=headers)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (AssertionError, FailureGroup) as exc:
            who = "merchant" if headers else "anonymous"
            report = _first_lines(exc)
            failures.setdefault(
                f"{operation.label} ({who}) {report.splitlines()[1]}", f"{response.status_code}: {report}"
            )

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # negative mode with every path id fixed and nothing else to get wrong: there is no invalid case to make
        assert mode == GenerationMode.NEGATIVE and not sent, operation.label
    return len(sent)


@pytest.mark.django_db(transaction=True)
def test_every_operation_answers_without_server_errors_and_as_the_schema_says(live_server, shop):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/")
    loaded = list(schema.get_all_operations())
    operations = [result.ok() for result in loaded]  # an operation the schema describes wrongly raises here
    operations.sort(key=lambda operation: METHOD_ORDER[operation.method.lower()])
    failures: dict[str, str] = {}
    sent = 0
    for operation in operations:
        path_ids = {p.name: shop["ids"][p.name] for p in operation.path_parameters if p.name in shop["ids"]}
        for headers in ({}, {"Authorization": f"Token {shop['token']}"}):
            for path_parameters in [None, path_ids] if path_ids else [None]:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    sent += _fuzz(
                        operation, mode, base_url=live_server.url, headers=headers, path_parameters=path_parameters,
                        failures=failures,
                    )  # fmt: skip
    assert len(operations) >= 18, [operation.label for operation in operations]
    assert sent >= len(operations) * 2 * 2 * 5, sent
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
