"""The admin dashboard: merchants and products, model versions (evaluate, switch, cancel an indexing), embeddings,
catalog uploads with live progress, duplicate findings, training runs (start, follow, cancel) and golden queries.

About 500 lines because it is where Django looks for every model's admin; each class stands alone and calls services
and selectors for anything it does, so a class is read on its own.
"""

import dataclasses

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from catalog import selectors
from catalog.intake import IntakeError
from catalog.intake.images import ValidatedImage, image_validate
from catalog.models import (
    DuplicateFinding,
    GoldenQuery,
    ImageEmbedding,
    ImportJob,
    Merchant,
    ModelVersion,
    Product,
    ProductImage,
    TrainingRun,
)
from catalog.services import golden, imports, model_versions, products, training

ADMIN_REJECTED_ROWS_SHOWN = 200  # enough to fix a bad export; the API pages through all of them


@admin.register(Merchant)
class MerchantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "golden_from_shoppers", "shopper_photo_retention_days", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["users"]


class ProductImageInline(admin.TabularInline):
    model = ProductImage
    extra = 0
    fields = ["file", "position", "status", "error", "embed_attempts", "sha256"]
    readonly_fields = ["sha256", "status", "error", "embed_attempts"]


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "title", "merchant", "category", "price", "active", "updated_at"]
    list_filter = ["active", "merchant", "category", "images__status"]
    search_fields = ["sku", "title"]
    list_select_related = ["merchant"]
    inlines = [ProductImageInline]
    actions = ["retry_failed_images"]

    @admin.action(description="Embed their failed images again", permissions=["change"])
    def retry_failed_images(self, request: HttpRequest, queryset: QuerySet[Product]) -> None:
        failed = ProductImage.objects.filter(product__in=queryset, status=ProductImage.Status.FAILED)
        retried = products.images_embed_retry(image_ids=list(failed.values_list("pk", flat=True)))
        self.message_user(request, f"{retried} failed image(s) queued for embedding again.")


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    """Versions are made by training and bootstrap, and switched only through the action below: editing `status`
    by hand would point search at a version whose embeddings may not exist."""

    list_display = ["name", "kind", "status", "golden_r1", "golden_r10", "compare_link", "fitted_on", "code_bits",
                    "fc7_dim", "created_at", "activated_at"]  # fmt: skip
    list_filter = ["status", "kind"]
    readonly_fields = [
        "kind", "status", "golden_table", "checkpoint", "code_bits", "fc7_dim", "config", "metrics", "created_at",
        "activated_at",
    ]  # fmt: skip
    actions = ["switch_to_version", "cancel_indexing", "evaluate_on_golden_set", "refit_version_zero"]

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        if request.method == "GET" and (due := model_versions.baseline_refit_due()) is not None:
            self.message_user(request, f"{due}: refit it on today's catalog (action: Refit version 0).", messages.INFO)
        return super().changelist_view(request, extra_context)

    @admin.display(description="fitted on (version 0)")
    def fitted_on(self, version: ModelVersion) -> str:
        images = model_versions.baseline_fitted_on(version)
        return "-" if images is None else f"{images:,} catalog images"

    @admin.action(
        description="Refit version 0 on today's catalog (a new version: switch to it once its golden numbers are in)",
        permissions=["change"],
    )
    def refit_version_zero(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one version 0 to refit.", messages.ERROR)
            return
        try:
            version = model_versions.model_version_refit_baseline(of=queryset.get())
        except ValueError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(
            request,
            f"Fitting {version.name} on a sample of today's catalog with the same recipe: it is evaluated on the "
            "golden set when ready; then compare it and switch to it.",
            messages.SUCCESS,
        )

    @admin.display(description="golden R@1")
    def golden_r1(self, version: ModelVersion) -> str:
        numbers = golden.version_golden(version)
        return "-" if numbers is None else f"{numbers['r1']:.1%}"

    @admin.display(description="golden R@10")
    def golden_r10(self, version: ModelVersion) -> str:
        numbers = golden.version_golden(version)
        return "-" if numbers is None else f"{numbers['r10']:.1%}"

    @admin.display(description="against the active version")
    def compare_link(self, version: ModelVersion) -> str:
        if version.status == ModelVersion.Status.ACTIVE:
            return "-"
        return format_html('<a href="{}">compare</a>', reverse("admin:catalog_modelversion_compare", args=[version.pk]))

    def get_urls(self):
        view = self.admin_site.admin_view
        custom = [path("<int:version_id>/compare/", view(self.compare_view), name="catalog_modelversion_compare")]
        return custom + super().get_urls()

    def compare_view(self, request: HttpRequest, version_id: int) -> HttpResponse:
        """The candidate against the active version, side by side: the golden set overall, per source, shop and
        category, and how much of the active version's top 10 it shares on recent shopper queries."""
        candidate = ModelVersion.objects.filter(pk=version_id).first()
        if candidate is None or not self.has_view_permission(request, candidate):
            raise PermissionDenied
        active = selectors.model_version_active()
        versions = [candidate] if active is None or active.pk == candidate.pk else [candidate, active]
        columns = [
            (f"{v.name} ({'candidate' if v.pk == candidate.pk else 'active'})", golden.version_golden(v) or {})
            for v in versions
        ]
        rows = golden.golden_by_category(versions)
        overlap = (golden.version_golden(candidate) or {}).get("recent_overlap")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Compare {candidate.name} with the active version",
            "candidate": candidate,
            "active": active,
            "golden": golden_numbers_html(columns),
            "category_headers": [f"{name} {label}" for name, _ in columns for _, label in golden.CATEGORY_NUMBERS],
            "category_rows": [
                (
                    row.category,
                    row.queries,
                    [_percent(n[key]) for n in row.numbers for key, _ in golden.CATEGORY_NUMBERS],
                )
                for row in rows
            ],
            "overlap": overlap,
            "overlap_shares": [_percent(overlap[key]) for key in ("overlap10", "same_top1")] if overlap else [],
            "concern": model_versions.model_version_switch_concern(version=candidate),
        }
        return TemplateResponse(request, "admin/catalog/modelversion/compare.html", context)

    @admin.display(description="golden set")
    def golden_table(self, version: ModelVersion) -> str:
        numbers = (version.metrics or {}).get(golden.GOLDEN_METRICS_KEY)
        if not numbers:
            return "not evaluated yet (action: Evaluate on the golden set)"
        if "error" in numbers:
            return f"evaluation failed: {numbers['error']}"
        return golden_numbers_html([(version.name, numbers)])

    @admin.action(description="Evaluate on the golden set (held-out views of the catalog + shoppers' photos)")
    def evaluate_on_golden_set(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        queued = []
        for version in queryset.exclude(checkpoint=""):
            golden.version_evaluate(version=version)
            queued.append(version.name)
        self.message_user(request, f"Evaluating {', '.join(queued) or 'nothing'}: the numbers appear on each version.")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_deleted_objects(self, objs, request: HttpRequest):
        """The active version and one being indexed are protected (ModelVersion.delete and its QuerySet's delete
        refuse them on every path): the delete page lists them as such instead of failing."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        refusals = [reason for version in objs if (reason := version.delete_refusal()) is not None]
        return deleted, counts, perms_needed, [*protected, *refusals]

    @admin.action(description="Cancel indexing (search keeps the current version)", permissions=["change"])
    def cancel_indexing(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        cancelled = [
            version.name
            for version in queryset.filter(status=ModelVersion.Status.INDEXING)
            if model_versions.model_version_cancel_indexing(version=version)
        ]
        self.message_user(request, f"Indexing cancelled: {', '.join(cancelled) or 'none was indexing'}.")

    @admin.action(
        description="Switch search to this version (embed the catalog with it, then activate)", permissions=["change"]
    )
    def switch_to_version(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> HttpResponse | None:
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one version to switch to.", messages.ERROR)
            return None
        version = queryset.get()
        try:
            model_versions.model_version_switch(version=version, override=bool(request.POST.get("override")))
        except model_versions.SwitchNeedsOverride as concern:
            return self.switch_confirmation(request, concern)
        except ValueError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return None
        self.message_user(
            request,
            f"{version.name} is indexing: search switches to it as soon as every image has its embedding "
            "(a version switched back to keeps its embeddings, so that is immediate).",
            messages.SUCCESS,
        )
        return None

    def switch_confirmation(self, request: HttpRequest, concern: model_versions.SwitchNeedsOverride) -> HttpResponse:
        """The refusal, with both versions' golden-set numbers side by side and a button that switches anyway."""
        columns = [
            (f"{v.name} ({label})", (v.metrics or {}).get(golden.GOLDEN_METRICS_KEY) or {})
            for v, label in ((concern.candidate, "candidate"), (concern.active, "active"))
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Switch search to {concern.candidate.name}?",
            "reason": concern.reason,
            "candidate": concern.candidate,
            "active": concern.active,
            "comparison": golden_numbers_html(columns),
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/catalog/modelversion/switch_confirm.html", context)


@admin.register(ImageEmbedding)
class ImageEmbeddingAdmin(admin.ModelAdmin):
    list_display = ["id", "image", "model_version", "category", "category_confidence", "created_at"]
    list_filter = ["model_version"]
    raw_id_fields = ["image", "product"]
    exclude = ["code", "fc7"]


class ImportUploadForm(forms.Form):
    merchant = forms.ModelChoiceField(queryset=Merchant.objects.all())
    manifest = forms.FileField(
        help_text="CSV or JSON lines: sku, title, description, category, attributes, price, url, active, "
        "images (zip entry names or http(s) URLs, separated by | or ;)"
    )
    images = forms.FileField(required=False, help_text="a zip of the image files the manifest names")
    manifest_format = forms.ChoiceField(
        choices=[("", "detect"), *ImportJob.Format.choices], required=False, label="format"
    )


def _progress_bar(job: ImportJob) -> str:
    progress = selectors.import_job_progress(job=job)
    eta = "" if progress.eta_seconds in (None, 0) else f", ETA {progress.eta_seconds:.0f} s"
    return format_html(
        '<progress max="100" value="{}" style="width:8em"></progress> {}% ({}/{}{})',
        progress.percent,
        progress.percent,
        progress.processed,
        progress.total,
        eta,
    )


@admin.register(ImportJob)
class ImportJobAdmin(admin.ModelAdmin):
    """Uploads go through the admin's upload form (the same service as the API); progress refreshes live."""

    list_display = ["id", "merchant", "source_name", "state", "progress", "ok", "rejected", "created_at"]
    list_filter = ["state", "merchant"]
    list_select_related = ["merchant"]
    actions = ["resume"]
    readonly_fields = [
        "merchant", "created_by", "source_name", "manifest_format", "state", "error", "progress", "total", "processed",
        "ok", "rejected", "images_new", "chunks_done", "chunks_total", "created_at", "started_at", "finished_at",
        "rejected_rows",
    ]  # fmt: skip
    exclude = ["errors", "archive", "archive_checked"]
    change_form_template = "admin/catalog/importjob/change_form.html"

    @admin.display(description="progress")
    def progress(self, job: ImportJob) -> str:
        return _progress_bar(job)

    @admin.display(description="rejected rows")
    def rejected_rows(self, job: ImportJob) -> str:
        rows = selectors.import_job_rejected_rows(job=job)[:ADMIN_REJECTED_ROWS_SHOWN]
        if not rows:
            return "none"
        return format_html(
            "<table><tr><th>line</th><th>sku</th><th>error</th></tr>{}</table>{}",
            format_html_join(
                "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", ((r["line"], r["sku"], r["error"]) for r in rows)
            ),
            f"(first {ADMIN_REJECTED_ROWS_SHOWN} of {job.rejected})"
            if job.rejected > ADMIN_REJECTED_ROWS_SHOWN
            else "",
        )

    @admin.action(description="Queue unfinished chunks again (after a lost broker)", permissions=["change"])
    def resume(self, request: HttpRequest, queryset) -> None:
        queued = sum(imports.import_job_resume(job=job) for job in queryset.exclude(state=ImportJob.State.DONE))
        self.message_user(request, f"{queued} chunks queued again")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs are created by the upload form below, never typed in

    def get_urls(self):
        view = self.admin_site.admin_view
        custom = [
            path("upload/", view(self.upload_view), name="catalog_importjob_upload"),
            path("<int:job_id>/progress/", view(self.progress_view), name="catalog_importjob_progress"),
        ]
        return custom + super().get_urls()

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        extra = {**(extra_context or {}), "upload_url": reverse("admin:catalog_importjob_upload")}
        return super().changelist_view(request, extra_context=extra)

    def upload_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request) or not request.user.has_perm("catalog.change_importjob"):
            raise PermissionDenied
        form = ImportUploadForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            manifest = form.cleaned_data["manifest"]
            try:
                with transaction.atomic():
                    job = imports.import_job_create(
                        merchant=form.cleaned_data["merchant"],
                        manifest=manifest.read(),
                        manifest_name=manifest.name,
                        manifest_format=form.cleaned_data["manifest_format"] or None,
                        archive=form.cleaned_data["images"],
                        created_by=request.user,
                    )
            except IntakeError as exc:
                form.add_error(None, str(exc))
            else:
                self.message_user(
                    request, f"Import {job.pk} queued: {job.total} rows, {job.rejected} rejected at upload"
                )
                return redirect("admin:catalog_importjob_change", job.pk)
        context = {**self.admin_site.each_context(request), "form": form, "opts": self.model._meta,
                   "title": "Upload a catalog"}  # fmt: skip
        return TemplateResponse(request, "admin/catalog/importjob/upload.html", context)

    def progress_view(self, request: HttpRequest, job_id: int) -> JsonResponse:
        job = ImportJob.objects.filter(pk=job_id).first()
        if job is None or not self.has_view_permission(request, job):
            raise PermissionDenied
        return JsonResponse({"state": job.state, **dataclasses.asdict(selectors.import_job_progress(job=job))})


@admin.register(DuplicateFinding)
class DuplicateFindingAdmin(admin.ModelAdmin):
    """Admins see both sides of every finding (merchants only ever see their own side)."""

    list_display = ["id", "kind", "merchant", "image", "own_sku", "other_merchant", "other_sku", "hamming",
                    "fc7_distance", "model_version", "created_at"]  # fmt: skip
    list_filter = ["kind", "merchant", "model_version"]
    list_select_related = ["merchant", "image__product", "other_image__product__merchant", "model_version"]
    raw_id_fields = ["image", "other_image"]

    @admin.display(description="sku")
    def own_sku(self, finding: DuplicateFinding) -> str:
        return finding.image.product.sku

    @admin.display(description="other merchant")
    def other_merchant(self, finding: DuplicateFinding) -> str:
        return str(finding.other_image.product.merchant)

    @admin.display(description="other sku")
    def other_sku(self, finding: DuplicateFinding) -> str:
        return finding.other_image.product.sku


TRAINING_DEFAULT_HELP = "blank: the default (the run page shows every value used once the run starts)"


class TrainingRunForm(forms.ModelForm):
    """What an admin chooses for a retraining run. A run stores only these choices: the train worker fills in
    everything else from the training defaults (workers.ml.training.TrainConfig, which this web process does not
    import) and writes the full configuration back onto the run."""

    epochs = forms.IntegerField(min_value=1, max_value=100, required=False, help_text=TRAINING_DEFAULT_HELP)
    code_bits = forms.TypedChoiceField(
        choices=[("", "default"), *((b, f"{b} bits") for b in (32, 64, 128, 256))],
        coerce=int,
        empty_value=None,
        required=False,
        help_text=TRAINING_DEFAULT_HELP,
    )
    input_size = forms.IntegerField(
        min_value=32, max_value=320, required=False, help_text=f"pixels; {TRAINING_DEFAULT_HELP}"
    )
    fine_tune_active = forms.BooleanField(
        required=False,
        initial=True,
        help_text="start from the active version: a trained network's weights, or version 0 as it searches "
        "(the run then takes version 0's input size and code length, and keeps it unless training measures better)",
    )

    class Meta:
        model = TrainingRun
        fields: list[str] = []

    def run_config(self) -> dict:
        """The admin's choices, as TrainConfig overrides: only the fields not left blank."""
        data = self.cleaned_data
        config: dict = {}
        if data["epochs"] is not None:
            config["epochs"] = data["epochs"]
        model = {name: data[name] for name in ("code_bits", "input_size") if data[name] is not None}
        if model:
            config["model"] = model
        active = selectors.model_version_active()
        if data["fine_tune_active"] and active and active.checkpoint:
            config["init_checkpoint"] = str(selectors.checkpoint_path(version=active))
        return config


LOSS_CURVE_SIZE = (360, 120)  # px: a glance, not an analysis tool


def loss_curve_svg(epoch_metrics: list[dict]) -> str:
    """Per-epoch training loss as an inline SVG polyline (no JavaScript, no chart library)."""
    losses = [float(m["loss"]) for m in epoch_metrics if "loss" in m]
    width, height = LOSS_CURVE_SIZE
    if len(losses) < 2:
        return ""
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    points = " ".join(
        f"{i * (width - 20) / (len(losses) - 1) + 10:.1f},{height - 10 - (loss - low) / span * (height - 20):.1f}"
        for i, loss in enumerate(losses)
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="training loss per epoch">'
        f'<polyline fill="none" stroke="#447e9b" stroke-width="2" points="{points}"/>'
        f'<text x="10" y="12" font-size="11">loss {high:.3f}</text>'
        f'<text x="10" y="{height - 1}" font-size="11">{low:.3f}</text></svg>'
    )


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    """Retraining from the dashboard: "Add" starts a run on the `train` queue; the run page shows its progress and
    loss curve; the resulting version is switched to from the model versions page."""

    form = TrainingRunForm
    list_display = ["id", "state", "progress_percent", "model_version", "created_by", "created_at", "finished_at"]
    list_filter = ["state"]
    actions = ["cancel_runs"]

    @admin.action(description="Cancel (a running run stops between two steps and registers no version)")
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[TrainingRun]) -> None:
        cancelled = [str(run.pk) for run in queryset if training.training_run_cancel(run=run)]
        self.message_user(request, f"Cancelled: {', '.join(cancelled) or 'none was pending or running'}.")

    def get_fields(self, request: HttpRequest, obj: TrainingRun | None = None) -> list[str]:
        if obj is None:
            return ["epochs", "code_bits", "input_size", "fine_tune_active"]
        return ["state", "progress_percent", "loss_curve", "epoch_table", "model_version", "config", "log"]

    def get_readonly_fields(self, request: HttpRequest, obj: TrainingRun | None = None) -> list[str]:
        if obj is None:
            return []
        return ["state", "progress_percent", "loss_curve", "epoch_table", "model_version", "config", "log"]

    def has_change_permission(self, request: HttpRequest, obj: TrainingRun | None = None) -> bool:
        return obj is None and super().has_change_permission(request)

    def save_model(self, request: HttpRequest, obj: TrainingRun, form: TrainingRunForm, change: bool) -> None:
        obj.config = form.run_config()
        obj.created_by = request.user if request.user.is_authenticated else None
        training.training_run_start(run=obj)

    @admin.display(description="progress")
    def progress_percent(self, obj: TrainingRun) -> str:
        return f"{obj.progress * 100:.0f}%"

    @admin.display(description="loss per epoch")
    def loss_curve(self, obj: TrainingRun) -> str:
        return mark_safe(loss_curve_svg(obj.epoch_metrics)) or "-"  # noqa: S308 - numbers we formatted ourselves

    @admin.display(description="metrics per epoch")
    def epoch_table(self, obj: TrainingRun) -> str:
        keys = sorted({key for m in obj.epoch_metrics for key in m if isinstance(m[key], int | float)})
        if not keys:
            return "-"
        header = format_html_join("", "<th>{}</th>", ((key,) for key in keys))
        rows = format_html_join(
            "",
            "<tr>{}</tr>",
            (
                (format_html_join("", "<td>{}</td>", ((_short(m.get(key)),) for key in keys)),)
                for m in obj.epoch_metrics
            ),
        )
        return format_html("<table><tr>{}</tr>{}</table>", header, rows)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")


def golden_numbers_html(columns: list[tuple[str, dict]]) -> str:
    """Golden-set numbers of one or more versions side by side: overall, per source and per shop."""
    names = [name for name, _ in columns]
    parts: list[tuple[str, list[dict | None]]] = [("all queries", [numbers for _, numbers in columns])]
    for group, label in (("by_source", "source"), ("by_shop", "shop")):
        keys = sorted({key for _, numbers in columns for key in (numbers.get(group) or {})})
        parts += [(f"{label} {key}", [(numbers.get(group) or {}).get(key) for _, numbers in columns]) for key in keys]
    header = format_html_join("", "<th>{}</th>", ((name,) for name in ["", *names]))
    rows = []
    for title, values in parts:
        rows.append(format_html("<tr><th colspan='{}'>{}</th></tr>", len(names) + 1, title))
        for key, heading, pattern in golden.GOLDEN_NUMBERS:
            cells = format_html_join(
                "", "<td>{}</td>", ((pattern.format(v[key]) if v and key in v else "-",) for v in values)
            )
            rows.append(format_html("<tr><td>{}</td>{}</tr>", heading, cells))
    return format_html("<table><tr>{}</tr>{}</table>", header, mark_safe("".join(rows)))  # noqa: S308


class GoldenQueryForm(forms.ModelForm):
    validated_photo: ValidatedImage  # set by clean_photo

    class Meta:
        model = GoldenQuery
        fields = ["product", "photo", "source"]

    def clean_photo(self):
        photo = self.cleaned_data["photo"]
        try:
            self.validated_photo = image_validate(photo.read())  # stored as is by save_model: decoded once
        except IntakeError as exc:
            raise forms.ValidationError(str(exc)) from exc
        photo.seek(0)
        return photo


@admin.register(GoldenQuery)
class GoldenQueryAdmin(admin.ModelAdmin):
    """Real shopper photos of known products: part of the golden set every version is evaluated on. Staff only:
    the photos are stored outside the published media and served only through this admin."""

    form = GoldenQueryForm
    list_display = ["id", "thumbnail", "product", "source", "consented_at", "created_at"]
    list_filter = ["source", "product__merchant"]
    list_select_related = ["product"]
    raw_id_fields = ["product"]

    def get_readonly_fields(self, request: HttpRequest, obj: GoldenQuery | None = None) -> list[str]:
        return [] if obj is None else ["thumbnail", "product", "photo", "source", "consented_at", "created_at"]

    def has_change_permission(self, request: HttpRequest, obj: GoldenQuery | None = None) -> bool:
        return obj is None and super().has_change_permission(request)

    def save_model(self, request: HttpRequest, obj: GoldenQuery, form: GoldenQueryForm, change: bool) -> None:
        created = golden.golden_query_store(product=obj.product, validated=form.validated_photo, source=obj.source)
        obj.pk, obj.photo, obj.created_at = created.pk, created.photo, created.created_at

    def get_urls(self):
        custom = [
            path("<int:query_id>/photo/", self.admin_site.admin_view(self.photo_view), name="catalog_goldenquery_photo")
        ]
        return custom + super().get_urls()

    @admin.display(description="photo")
    def thumbnail(self, obj: GoldenQuery) -> str:
        url = reverse("admin:catalog_goldenquery_photo", args=[obj.pk])
        return format_html('<img src="{}" alt="golden query {}" style="max-height:64px">', url, obj.pk)

    def photo_view(self, request: HttpRequest, query_id: int) -> FileResponse:
        query = GoldenQuery.objects.filter(pk=query_id).first()
        if query is None or not self.has_view_permission(request, query):
            raise PermissionDenied
        return FileResponse(query.photo.open("rb"))
