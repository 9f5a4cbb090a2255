"""The data model on the real embedded PostgreSQL + pgvector."""

import numpy as np
import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from pgvector import Bit
from pgvector.django import HammingDistance, L2Distance

from catalog.codes import code_index_name, code_sql, version_sql
from catalog.models import ImageEmbedding, IndexChange, ModelVersion, Product, ProductImage
from catalog.services import model_versions
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def version() -> ModelVersion:
    return ModelVersion.objects.create(name="v-test", code_bits=8, fc7_dim=3)


@pytest.fixture
def product() -> Product:
    return factories.product(factories.merchant(), title="Red dress")


def make_image(product: Product, name: str) -> ProductImage:
    return factories.image(product, name)


def test_all_migrations_are_applied_and_pgvector_is_installed():
    executor = MigrationExecutor(connection)
    assert executor.migration_plan(executor.loader.graph.leaf_nodes()) == []
    with connection.cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        (version,) = cursor.fetchone()
    assert tuple(int(part) for part in version.split(".")[:2]) >= (0, 8)


def test_bit_code_round_trips_and_hamming_ordering_is_right(product, version):
    query = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    flips = {"far": [0, 2, 3, 6, 7], "near": [1], "exact": [], "mid": [0, 4, 5]}
    for name, flipped in flips.items():
        bits = query.copy()
        bits[flipped] = ~bits[flipped]
        image = make_image(product, name)
        factories.embedding(image=image, model_version=version, bits=bits, fc7=np.zeros(3))

    stored = ImageEmbedding.objects.get(image__file__contains="near")
    expected = query.copy()
    expected[1] = ~expected[1]
    assert stored.code == Bit(expected).to_text()

    ranked = (
        ImageEmbedding.objects.annotate(distance=HammingDistance("code", Bit(query).to_text()))
        .order_by("distance")
        .values_list("image__file", "distance")
    )
    assert [(name.split("/")[-1].split("_")[0].removesuffix(".png"), d) for name, d in ranked] == [
        ("exact", 0),
        ("near", 1),
        ("mid", 3),
        ("far", 5),
    ]


def test_fc7_l2_ordering(product, version):
    for name, vector in {"a": [0, 0, 0], "b": [3, 0, 0], "c": [1, 1, 0]}.items():
        factories.embedding(
            image=make_image(product, name),
            model_version=version,
            bits=np.zeros(8, bool),
            fc7=np.array(vector),
        )
    ranked = ImageEmbedding.objects.order_by(L2Distance("fc7", [2.9, 0, 0])).values_list("image__file", flat=True)
    assert [name.split("/")[-1][0] for name in ranked] == ["b", "c", "a"]


def test_saving_an_embedding_of_the_wrong_sizes_is_refused(product, version):
    with pytest.raises(ValueError, match="expects 8 bits"):
        factories.embedding(
            image=make_image(product, "x"), model_version=version, bits=np.zeros(16, bool), fc7=np.zeros(3)
        )


def test_saving_an_embedding_again_is_an_upsert(product, version):
    image = make_image(product, "x")
    factories.embedding(image=image, model_version=version, bits=np.zeros(8, bool), fc7=np.zeros(3))
    factories.embedding(image=image, model_version=version, bits=np.ones(8, bool), fc7=np.ones(3))
    assert ImageEmbedding.objects.get().code == "11111111"


def test_database_rejects_a_second_active_model_version():
    ModelVersion.objects.create(name="one", status=ModelVersion.Status.ACTIVE)
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelVersion.objects.create(name="two", status=ModelVersion.Status.ACTIVE)
    assert ModelVersion.objects.filter(status="active").count() == 1


def test_activation_retires_the_previous_version_and_indexes_codes(product):
    first = ModelVersion.objects.create(name="first", code_bits=8, fc7_dim=3)
    second = ModelVersion.objects.create(name="second", code_bits=8, fc7_dim=3)
    model_versions.model_version_activate(version=first)
    model_versions.model_version_activate(version=second)
    statuses = dict(ModelVersion.objects.values_list("name", "status"))
    assert statuses == {"first": "retired", "second": "active"}

    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [code_index_name(version_id=second.pk)])
        (definition,) = cursor.fetchone()
    assert "hnsw" in definition and "bit_hamming_ops" in definition and "bit(8)" in definition

    # The planner uses the version's index for a Hamming top-k written with catalog.codes' expressions.
    with connection.cursor() as cursor:
        # The tables hold a handful of rows, so a cheaper plan exists (the version's btree, then a sort) and what
        # the statistics say depends on the tests before: forbid the plans that are not ordered by an index.
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            cursor.execute(f"SET LOCAL {setting} = off")
        cursor.execute(
            f"EXPLAIN SELECT id FROM catalog_imageembedding e WHERE {version_sql('e', second.pk)} "
            f"ORDER BY {code_sql('e.code', 8)} <~> {code_sql('%s', 8)} LIMIT 5",
            ["10101010"],
        )
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert code_index_name(version_id=second.pk) in plan


def test_change_sequence_records_embedding_writes_deletes_and_visibility(product, version):
    image = make_image(product, "x")
    start = IndexChange.objects.order_by("-id").values_list("id", flat=True).first() or 0
    embedding = factories.embedding(image=image, model_version=version, bits=np.zeros(8, bool), fc7=np.zeros(3))
    product.active = False
    product.save()
    product.title = "renamed"  # not a visibility change: only what its result card shows (migration 0013)
    product.save()
    product.save()  # nothing changed: no notification
    product_id = product.pk
    product.delete()  # cascades to the image and its embedding
    changes = list(IndexChange.objects.filter(id__gt=start).values_list("op", "embedding_id", "product_id"))
    # Django deletes the cascade children first: the embedding, then the product.
    assert changes == [
        ("embedding", embedding.pk, product_id),
        ("product", None, product_id),
        ("card", None, product_id),
        ("embedding", embedding.pk, product_id),
        ("product", None, product_id),
    ]
    ids = list(IndexChange.objects.filter(id__gt=start).values_list("id", flat=True))
    assert ids == sorted(ids)
