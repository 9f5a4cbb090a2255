"""The data model (docs/architecture.md walks through it with the three flows that use it).

Codes and fc7 vectors are stored unsized (`bit`, `vector`) because model versions may differ in code length and
fc7 size; each version gets its own partial HNSW index on `code::bit(B)` when it is activated
(`catalog.services.model_versions.code_index_ensure`), which is how pgvector indexes mixed-size columns.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.storage import FileSystemStorage
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from pgvector.django import BitField, VectorField


class CodeField(BitField):
    """A binary code of any length: `bit varying`, since a bare `bit` column in PostgreSQL means `bit(1)`."""

    def db_type(self, connection) -> str:
        return "bit varying" if self.length is None else f"bit({int(self.length)})"


class Merchant(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    users = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="merchants", blank=True)
    # Shoppers' photos (their "this is the one", a sample of their searches) are kept only where the shop says so
    # (off by default), and only for so long: catalog.services.maintenance.shopper_photos_expire deletes older ones
    # and their files.
    golden_from_shoppers = models.BooleanField(
        default=False,
        help_text="keep a shopper's photo, with their consent, when they mark a result of this shop as the product "
        'in it ("this is the one"): it joins the golden set new model versions are evaluated on',
    )
    keep_recent_queries = models.BooleanField(
        default=False,
        help_text="keep a small sample of shoppers' search photos of this shop, to compare a new model version's "
        "results with the active one's (the compare page)",
    )
    shopper_photo_retention_days = models.PositiveIntegerField(
        default=90, validators=[MinValueValidator(1)], help_text="days a shopper's photo is kept, then deleted"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Product(models.Model):
    merchant = models.ForeignKey(Merchant, on_delete=models.CASCADE, related_name="products")
    sku = models.CharField(max_length=100)
    title = models.CharField(max_length=300)
    description = models.TextField(blank=True)
    category = models.CharField(max_length=100, blank=True, db_index=True)
    attributes = models.JSONField(default=list, blank=True)  # attribute names, e.g. ["red", "striped"]
    price = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    url = models.URLField(max_length=1000, blank=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["merchant_id", "sku"]
        constraints = [models.UniqueConstraint(fields=["merchant", "sku"], name="product_sku_unique_per_merchant")]

    def __str__(self) -> str:
        return f"{self.sku}: {self.title}"


class ProductImage(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        EMBEDDED = "embedded"
        FAILED = "failed"

    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="images")
    file = models.ImageField(upload_to="products/%Y/%m/", width_field="width", height_field="height")
    sha256 = models.CharField(max_length=64, db_index=True)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    size_bytes = models.PositiveIntegerField(default=0)
    position = models.PositiveSmallIntegerField(default=0)  # 0 = the product's main image
    source_url = models.URLField(max_length=2000, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True)
    # Embed deliveries that began work on this image since it was last embedded (catalog.services.embeddings): one
    # that dies with its process (out of memory, hard time limit) leaves its count, and at EMBED_MAX_ATTEMPTS the
    # image ends FAILED instead of being handed out again forever. `embed_attempt_by` names the delivery that counted
    # last (Celery task id and retry number), so a retry after a database error continues its attempt.
    embed_attempts = models.PositiveSmallIntegerField(default=0)
    embed_attempt_by = models.CharField(max_length=80, blank=True)
    embed_attempted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["product_id", "position", "id"]
        constraints = [models.UniqueConstraint(fields=["product", "sha256"], name="image_unique_per_product")]

    def __str__(self) -> str:
        return f"image {self.pk} of {self.product_id}"


class ImageFetch(models.Model):
    """A product image the merchant API was asked to add by URL: fetched by a worker (never in the web thread,
    which a slow image host would hold for the whole fetch deadline); the API answers 202 with this to poll."""

    class State(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="image_fetches")
    url = models.URLField(max_length=2000)
    position = models.PositiveSmallIntegerField(default=0)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    error = models.TextField(blank=True)  # why it failed, for the merchant
    image = models.ForeignKey(ProductImage, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"image fetch {self.pk} for {self.product_id} ({self.state})"


class ModelVersionQuerySet(models.QuerySet):
    def delete(self) -> tuple[int, dict[str, int]]:
        for version in self.filter(status__in=UNDELETABLE_VERSION_STATUSES):
            version.delete_guard()
        return super().delete()


UNDELETABLE_VERSION_STATUSES = ("active", "indexing")


class ModelVersion(models.Model):
    class Status(models.TextChoices):
        TRAINING = "training"
        READY = "ready"
        INDEXING = "indexing"
        ACTIVE = "active"
        RETIRED = "retired"
        FAILED = "failed"

    class Kind(models.TextChoices):
        BASELINE = "baseline", "pretrained backbone + PCA + ITQ"
        FASHIONNET = "fashionnet", "trained multi-task network"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.BASELINE)
    config = models.JSONField(default=dict, blank=True)
    checkpoint = models.CharField(max_length=500, blank=True)  # path under MODELS_DIR (or absolute)
    code_bits = models.PositiveSmallIntegerField(default=64)
    fc7_dim = models.PositiveIntegerField(default=512)
    metrics = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)

    objects = ModelVersionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Search reads exactly one version's vectors: the database, not the code, guarantees there is one.
            models.UniqueConstraint(
                fields=["status"], condition=Q(status="active"), name="exactly_one_active_model_version"
            ),
            # One version indexes at a time: two switches started at once cannot both embed the whole catalog.
            models.UniqueConstraint(
                fields=["status"], condition=Q(status="indexing"), name="one_indexing_model_version"
            ),
            models.CheckConstraint(
                condition=Q(code_bits__gte=8) & Q(code_bits__lte=1024), name="model_version_code_bits_range"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"

    def delete_refusal(self) -> str | None:
        """Why this version may not be deleted now, or None. Search reads the active version's embeddings and an
        indexing version is about to become active: deleting either (its embeddings cascade away) takes search
        down."""
        if self.status == self.Status.ACTIVE:
            return f"{self.name} is the version search uses: switch to another version first"
        if self.status == self.Status.INDEXING:
            return f"{self.name} is being indexed to become the search version: cancel its indexing first"
        return None

    def delete_guard(self) -> None:
        """Raise ProtectedError if the version (its status as stored now) may not be deleted. Checked by delete()
        and ModelVersionQuerySet.delete() before anything is deleted."""
        stored = ModelVersion._base_manager.filter(pk=self.pk).values_list("status", flat=True).first()
        if stored is not None and (reason := ModelVersion(name=self.name, status=stored).delete_refusal()):
            raise models.ProtectedError(reason, {self})

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        self.delete_guard()
        return super().delete(*args, **kwargs)


class ImageEmbedding(models.Model):
    image = models.ForeignKey(ProductImage, on_delete=models.CASCADE, related_name="embeddings")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="embeddings")
    # Denormalised from image.product so the coarse and fine stages need no join to group by product.
    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="embeddings")
    code = CodeField()  # B bits; B = model_version.code_bits
    fc7 = VectorField()  # D floats; D = model_version.fc7_dim
    category = models.CharField(max_length=100, blank=True)  # predicted
    category_confidence = models.FloatField(null=True, blank=True)
    attributes = models.JSONField(default=dict, blank=True)  # predicted: name -> probability (top ones)
    landmarks = models.JSONField(default=list, blank=True)  # predicted: [[x, y, visibility], ...] in [0, 1]
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["image", "model_version"], name="embedding_unique_per_image_version")
        ]
        indexes = [models.Index(fields=["model_version", "product"], name="embedding_version_product")]

    def __str__(self) -> str:
        return f"embedding of image {self.image_id} by version {self.model_version_id}"


class ImageKeypoints(models.Model):
    """An image's local features for the search's geometric verification (catalog.geometry's packed format:
    float16 xy + uint8 SIFT descriptors, ~17 KB for 128 features). They depend on the image alone, not on a model
    version, and are written once by the embedding worker; a table of their own so that no ProductImage query
    carries the blob. No row: not computed yet (the search then leaves that candidate unverified)."""

    image = models.OneToOneField(ProductImage, on_delete=models.CASCADE, primary_key=True, related_name="keypoints")
    data = models.BinaryField()
    features = models.PositiveSmallIntegerField(default=0)  # how many keypoints the blob holds (0: a blank image)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.features} keypoints of image {self.image_id}"


class IndexChange(models.Model):
    """The change sequence in-memory coarse indexes follow: written by database triggers (migration 0002), so
    no write path (service, admin, bulk delete, cascade) can forget it. Rows are notifications, not state:
    a reader re-reads the current rows of whatever ids it is told about."""

    class Op(models.TextChoices):
        EMBEDDING = "embedding"  # an embedding row was inserted, updated or deleted
        PRODUCT = "product"  # a product's visibility (active) changed or it was deleted
        CARD = "card"  # what a result card shows changed (migration 0013); no embedding id: a product's, none: all

    id = models.BigAutoField(primary_key=True)
    op = models.CharField(max_length=16, choices=Op.choices)
    embedding_id = models.BigIntegerField(null=True)
    product_id = models.BigIntegerField(null=True)
    model_version_id = models.BigIntegerField(null=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"change {self.pk}: {self.op} e={self.embedding_id} p={self.product_id}"


class ImportJob(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    class Format(models.TextChoices):
        CSV = "csv"
        JSONL = "jsonl", "JSON lines"

    merchant = models.ForeignKey(Merchant, on_delete=models.CASCADE, related_name="import_jobs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True)
    source_name = models.CharField(max_length=300, blank=True)
    manifest_format = models.CharField(max_length=8, choices=Format.choices, default=Format.CSV)
    # The uploaded zip of images, kept until the job's chunks have read their entries from it.
    archive = models.FileField(upload_to="imports/%Y/%m/", blank=True)
    # The upload request checks only what the zip's headers declare; inflating every entry (catalog.intake.zips
    # zip_check) is the job's first task, and its chunks run only once it has passed.
    archive_checked = models.BooleanField(default=False)
    error = models.TextField(blank=True)  # why a FAILED job failed (its zip was refused), for the merchant
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    images_new = models.PositiveIntegerField(default=0)  # images stored (and queued for embedding) by this job
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    total = models.PositiveIntegerField(default=0)
    processed = models.PositiveIntegerField(default=0)
    ok = models.PositiveIntegerField(default=0)
    rejected = models.PositiveIntegerField(default=0)
    # Rows rejected at upload [{"line": 12, "sku": "...", "error": "..."}]; rows rejected while importing are on
    # the chunks. `selectors.import_job_rejected_rows` lists both.
    errors = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"import {self.pk} for {self.merchant_id} ({self.state})"


class ImportChunk(models.Model):
    """A slice of an import's parsed manifest rows, processed by one task in one transaction: `done` and the
    job's counters commit together with the rows, so a chunk re-run after a lost worker changes nothing twice."""

    job = models.ForeignKey(ImportJob, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    rows = models.JSONField(default=list)  # parsed manifest rows, each with its manifest line number
    done = models.BooleanField(default=False)
    ok = models.PositiveIntegerField(default=0)
    rejected = models.PositiveIntegerField(default=0)
    # This chunk's rejected rows; kept here rather than appended to the job's list so that a large, bad import
    # does not rewrite an ever-growing JSON document once per chunk.
    errors = models.JSONField(default=list, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job_id", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="import_chunk_unique_index")]

    def __str__(self) -> str:
        return f"chunk {self.index} of import {self.job_id}"


class DuplicateFinding(models.Model):
    """An image whose code and fc7 are near-identical to another product's image, found after embedding.

    Stored once per direction, so each side's merchant sees a finding about its own image; for a possible copy
    the other side is never shown to a merchant (only to admins)."""

    class Kind(models.TextChoices):
        DUPLICATE_LISTING = "duplicate_listing", "duplicate listing (same merchant)"
        POSSIBLE_COPY = "possible_copy", "possible copy (another merchant)"

    merchant = models.ForeignKey(Merchant, on_delete=models.CASCADE, related_name="duplicate_findings")
    image = models.ForeignKey(ProductImage, on_delete=models.CASCADE, related_name="duplicate_findings")
    other_image = models.ForeignKey(ProductImage, on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    hamming = models.PositiveIntegerField()
    fc7_distance = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["image", "other_image", "model_version"], name="duplicate_finding_unique_pair"
            )
        ]
        indexes = [models.Index(fields=["merchant", "kind"], name="duplicate_merchant_kind")]

    def __str__(self) -> str:
        return f"{self.kind}: image {self.image_id} ~ image {self.other_image_id}"


class TrainingRun(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    config = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    # Set by the admin's "cancel"; the train worker reads it between steps, stops, and registers nothing.
    cancel_requested = models.BooleanField(default=False)
    progress = models.FloatField(default=0.0)  # 0..1
    epoch_metrics = models.JSONField(default=list, blank=True)  # one dict per epoch, for the dashboard's curves
    log = models.TextField(blank=True)
    model_version = models.OneToOneField(
        ModelVersion, on_delete=models.SET_NULL, null=True, blank=True, related_name="training_run"
    )
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"training run {self.pk} ({self.state})"


def golden_query_storage() -> FileSystemStorage:
    """Shopper photos are not catalog images: they live outside MEDIA_ROOT (which the web server publishes), in
    PRIVATE_MEDIA_ROOT, and only the staff-only admin serves them."""
    return FileSystemStorage(location=settings.PRIVATE_MEDIA_ROOT)


class GoldenQuery(models.Model):
    """A real shopper photo of a known product: with held-out views of the catalog's own products, the golden set
    every model version is evaluated on (workers.pipelines.version_evaluate_golden). Staff only."""

    class Source(models.TextChoices):
        ADMIN = "admin", "added by an admin"
        SHOPPER = "shopper", "a shopper's confirmed result"

    photo = models.ImageField(upload_to="golden/%Y/%m/", storage=golden_query_storage)
    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="golden_queries")
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.ADMIN)
    # When the shopper ticked "keep my photo" (a shopper's photo is never stored without it); None: added by staff.
    consented_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "golden queries"

    def __str__(self) -> str:
        return f"golden query {self.pk} of product {self.product_id}"


class RecentQuery(models.Model):
    """A sampled shopper search photo, kept only where the shop allows it (Merchant.keep_recent_queries), for its
    retention, and never more than settings.RECENT_QUERIES_MAX: a candidate version's top 10 is compared with the
    active version's on them (workers.pipelines.recent_overlap). Staff-only storage, like golden queries."""

    photo = models.ImageField(upload_to="recent/%Y/%m/", storage=golden_query_storage)
    # The shop the search was scoped to; None: all shops (kept only when every shop allows it).
    merchant = models.ForeignKey(Merchant, on_delete=models.CASCADE, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "recent queries"

    def __str__(self) -> str:
        return f"recent query {self.pk}"
