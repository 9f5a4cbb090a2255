"""Model versions: version 0's bootstrap, the outcome of fitting one, indexing the catalog with a version and the
atomic switch that makes it the one search reads. The network itself runs in the workers (workers.pipelines)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from catalog import dispatch, selectors
from catalog.codes import code_index_create_sql
from catalog.models import ModelVersion
from catalog.services.golden import GOLDEN_RANKING_METRIC, version_golden


def code_index_ensure(*, version: ModelVersion) -> None:
    """Create the version's HNSW index on its codes unless it exists (catalog.codes says why one per version)."""
    with connection.cursor() as cursor:
        cursor.execute(code_index_create_sql(version_id=version.pk, code_bits=version.code_bits))


def model_version_activate(*, version: ModelVersion) -> ModelVersion:
    """Make `version` the one search reads, atomically: the previous active version is retired in the same
    transaction, and the partial unique constraint rejects any concurrent second activation."""
    code_index_ensure(version=version)
    with transaction.atomic():
        ModelVersion.objects.select_for_update().filter(status=ModelVersion.Status.ACTIVE).exclude(
            pk=version.pk
        ).update(status=ModelVersion.Status.RETIRED)
        version.status = ModelVersion.Status.ACTIVE
        version.activated_at = timezone.now()
        version.save(update_fields=["status", "activated_at"])
        dispatch.warm_up_search()
    return version


DEFAULT_BASELINE_FC7_DIM = 256


def model_version_bootstrap(
    *, name: str = "v0-baseline", code_bits: int = 256, fc7_dim: int = DEFAULT_BASELINE_FC7_DIM
) -> ModelVersion:
    """Make sure a shop can search before anyone trains: if no version is active or on its way, fit version 0
    (pretrained backbone + PCA + ITQ) on the catalog in the background. Returns the version that will serve."""
    serving = ModelVersion.objects.filter(
        status__in=[ModelVersion.Status.ACTIVE, ModelVersion.Status.INDEXING, ModelVersion.Status.TRAINING]
    ).first()
    if serving:
        return serving
    version = ModelVersion.objects.create(
        name=name if not ModelVersion.objects.filter(name=name).exists() else f"{name}-{timezone.now():%Y%m%d%H%M%S}",
        kind=ModelVersion.Kind.BASELINE,
        status=ModelVersion.Status.TRAINING,
        code_bits=code_bits,
        fc7_dim=fc7_dim,
    )
    dispatch.fit_baseline(version_id=version.pk)
    return version


# --- refitting version 0 as the catalog grows ------------------------------------------------------------------------
# Version 0's PCA and ITQ are fitted on a random sample of the catalog as it was: a catalog that has since grown
# several times over (other merchants, other kinds of product) is described by directions fitted on a fraction of
# it. A refit is a new version, fitted with the same recipe on a sample of today's catalog, evaluated on the golden
# set and switched to like any other (the switch refuses it if it scores worse).
FIT_METRICS_KEY = "fit"


@dataclass(frozen=True)
class RefitDue:
    version: ModelVersion  # the baseline version whose fit is out of date
    fitted_on: int  # usable catalog images when it was fitted
    now: int  # usable catalog images today

    @property
    def growth(self) -> float:
        return self.now / max(self.fitted_on, 1)

    def __str__(self) -> str:
        return (
            f"The catalog holds {self.now:,} images, {self.growth:.1f}x the {self.fitted_on:,} that "
            f"{self.version.name} was fitted on"
        )


def baseline_fit_record(*, version: ModelVersion, catalog_images: int, sample: int) -> None:
    """What a version 0 was fitted on (metrics["fit"]): what `baseline_refit_due` measures the catalog's growth by."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        locked.metrics = {**(locked.metrics or {}), FIT_METRICS_KEY: {"catalog_images": catalog_images,
                                                                      "sample": sample}}  # fmt: skip
        locked.save(update_fields=["metrics"])
    version.metrics = locked.metrics


def baseline_fitted_on(version: ModelVersion) -> int | None:
    """Usable catalog images when this version 0 was fitted; None for a trained network or an unrecorded fit."""
    if version.kind != ModelVersion.Kind.BASELINE:
        return None
    fit = (version.metrics or {}).get(FIT_METRICS_KEY) or {}
    count = fit.get("catalog_images")
    return int(count) if isinstance(count, int) and count > 0 else None


def baseline_refit_due(*, version: ModelVersion | None = None, growth: float | None = None) -> RefitDue | None:
    """The active version 0 (or `version`), if the catalog has grown `growth` times over (settings
    BASELINE_REFIT_GROWTH) since it was fitted; None otherwise, and for a trained network."""
    growth = settings.BASELINE_REFIT_GROWTH if growth is None else growth
    version = version or selectors.model_version_active()
    fitted_on = None if version is None else baseline_fitted_on(version)
    if version is None or fitted_on is None or growth <= 0:
        return None
    now = selectors.images_usable_count()
    return RefitDue(version=version, fitted_on=fitted_on, now=now) if now >= growth * fitted_on else None


def model_version_refit_baseline(*, of: ModelVersion) -> ModelVersion:
    """Fit a new version 0 with `of`'s recipe on a sample of today's catalog, in the background. It ends ready and
    evaluated on the golden set, and search switches to it only through `model_version_switch` (an admin's action;
    refused if it scores worse). One fit at a time: ValueError while another version 0 is being fitted."""
    if of.kind != ModelVersion.Kind.BASELINE:
        raise ValueError(f"{of.name} is a trained network: retrain it instead of refitting")
    with transaction.atomic():
        fitting = ModelVersion.objects.select_for_update().filter(
            kind=ModelVersion.Kind.BASELINE, status=ModelVersion.Status.TRAINING
        )
        if busy := fitting.first():
            raise ValueError(f"{busy.name} is being fitted already")
        recipe = (of.config or {}).get("baseline") or {}
        version = ModelVersion.objects.create(
            name=f"v0-refit-{timezone.now():%Y%m%d%H%M%S}",
            kind=ModelVersion.Kind.BASELINE,
            status=ModelVersion.Status.TRAINING,
            code_bits=of.code_bits,
            fc7_dim=DEFAULT_BASELINE_FC7_DIM,  # (the fit clamps it to what the sample allows)
            config={"baseline": recipe, "refit_of": of.pk},
        )
        dispatch.fit_baseline(version_id=version.pk)
    return version


def baseline_refit_if_due() -> ModelVersion | None:
    """The periodic check (beat): start refitting the active version 0 when the catalog has outgrown its fit, unless
    a fit is running or a refit of it is waiting for an admin's switch already."""
    due = baseline_refit_due()
    if due is None:
        return None
    if ModelVersion.objects.filter(status=ModelVersion.Status.TRAINING).exists():
        return None  # a fit or a retrain is running
    waiting = ModelVersion.objects.filter(
        status__in=[ModelVersion.Status.READY, ModelVersion.Status.INDEXING], config__refit_of=due.version.pk
    )
    if waiting.exists():
        return None
    return model_version_refit_baseline(of=due.version)


def model_version_fail(*, version: ModelVersion, error: str) -> None:
    """Fitting the version failed: it never serves, and says why."""
    version.status = ModelVersion.Status.FAILED
    version.metrics = {"error": error[:1000]}
    version.save(update_fields=["status", "metrics"])


def model_version_ready(
    *, version: ModelVersion, checkpoint: Path, code_bits: int, fc7_dim: int, config: dict[str, Any]
) -> ModelVersion:
    """A fitted version's checkpoint and its real sizes (a fit may clamp fc7 to its sample): ready to index."""
    version.checkpoint = str(checkpoint)
    version.code_bits = code_bits
    version.fc7_dim = fc7_dim
    version.config = config
    version.status = ModelVersion.Status.READY
    version.save()
    return version


def model_version_register(
    *, name: str, kind: str, checkpoint: Path, code_bits: int, fc7_dim: int, config: dict[str, Any]
) -> ModelVersion:
    """A network trained elsewhere (e.g. by `python -m workers.ml.benchmark`), already checked to load, as a ready
    version: evaluated and switched to like one trained from the dashboard."""
    if ModelVersion.objects.filter(name=name).exists():
        raise ValueError(f"a model version named {name!r} exists already")
    return ModelVersion.objects.create(
        name=name, kind=kind, status=ModelVersion.Status.READY, checkpoint=str(checkpoint), code_bits=code_bits,
        fc7_dim=fc7_dim, config=config,
    )  # fmt: skip


SWITCHABLE_STATUSES = (ModelVersion.Status.READY, ModelVersion.Status.RETIRED)


class SwitchNeedsOverride(ValueError):
    """Switching to a new version would, or might, make search worse on the golden set: only an explicit override
    (which the admin asks for with both versions' numbers side by side) switches anyway."""

    def __init__(self, reason: str, *, candidate: ModelVersion, active: ModelVersion) -> None:
        super().__init__(f"{reason}; switch with the override to use it anyway")
        self.reason, self.candidate, self.active = reason, candidate, active


def model_version_switch_concern(*, version: ModelVersion) -> SwitchNeedsOverride | None:
    """Why switching to `version` needs an override, or None. Only a new (ready) version is gated: rolling back to
    a retired version that served before stays one action. Worse means a lower R@1 on the golden set."""
    active = selectors.model_version_active()
    if version.status != ModelVersion.Status.READY or active is None or active.pk == version.pk:
        return None
    ours, theirs = version_golden(version), version_golden(active)
    if ours is None:
        reason = f"{version.name} has not been evaluated on the golden set"
    elif theirs is None:
        reason = f"the active version {active.name} has no golden-set numbers to compare with"
    elif ours[GOLDEN_RANKING_METRIC] < theirs[GOLDEN_RANKING_METRIC]:
        reason = (
            f"{version.name} scores worse than the active version {active.name} on the golden set "
            f"(R@1 {ours[GOLDEN_RANKING_METRIC]:.1%} against {theirs[GOLDEN_RANKING_METRIC]:.1%})"
        )
    else:
        return None
    return SwitchNeedsOverride(reason, candidate=version, active=active)


def model_version_switch(*, version: ModelVersion, override: bool = False) -> ModelVersion:
    """An admin's "use this version": a trained (ready) version, or a retired one to roll back to. Search keeps
    the current version until `version` has embedded every image, then switches atomically.

    A ready version that scores worse than the active one on the golden set (or that cannot be compared with it)
    raises SwitchNeedsOverride unless `override` is given."""
    if version.status not in SWITCHABLE_STATUSES:
        raise ValueError(f"{version.name} is {version.status}; only a ready or retired version can be switched to")
    if not version.checkpoint:
        raise ValueError(f"{version.name} has no checkpoint")
    busy = ModelVersion.objects.filter(status=ModelVersion.Status.INDEXING).exclude(pk=version.pk).first()
    if busy is not None:
        raise ValueError(f"{busy.name} is still being indexed; switch when it is done (or cancel its indexing)")
    concern = model_version_switch_concern(version=version)
    if concern is not None and not override:
        raise concern
    return model_version_start_indexing(version=version)


def model_version_start_indexing(*, version: ModelVersion) -> ModelVersion:
    """Embed the whole catalog with `version` in the background; it becomes active when that is complete.

    One version indexes at a time, and the database says so (the partial unique index
    `one_indexing_model_version`): of two switches started at once, the second fails here with ValueError."""
    code_index_ensure(version=version)
    with transaction.atomic():
        version.status = ModelVersion.Status.INDEXING
        try:
            with transaction.atomic():
                version.save(update_fields=["status"])
        except IntegrityError:
            busy = ModelVersion.objects.filter(status=ModelVersion.Status.INDEXING).exclude(pk=version.pk).first()
            version.refresh_from_db(fields=["status"])
            raise ValueError(
                f"{busy.name if busy else 'another version'} is still being indexed; switch when it is done"
            ) from None
        dispatch.embed_images(
            image_ids=list(selectors.images_missing_embedding(version=version).values_list("id", flat=True))
        )
        dispatch.finish_indexing(version_id=version.pk)
    return version


def model_version_cancel_indexing(*, version: ModelVersion) -> bool:
    """An admin's "cancel indexing": search keeps its current version, and `version` goes back to what it was
    (ready, or retired if it served before), keeping the embeddings written so far (a later switch reuses them).
    Queued embed batches then skip it and its finishing task stops. False if it was not indexing."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().filter(pk=version.pk).first()
        if locked is None or locked.status != ModelVersion.Status.INDEXING:
            return False
        locked.status = ModelVersion.Status.RETIRED if locked.activated_at else ModelVersion.Status.READY
        locked.save(update_fields=["status"])
    version.status = locked.status
    return True


def model_version_finish_indexing(*, version: ModelVersion) -> bool:
    """Activate `version` if every image has its embedding (the atomic switch); False if not yet."""
    if selectors.images_missing_embedding(version=version).exists():
        return False
    model_version_activate(version=version)
    return True
