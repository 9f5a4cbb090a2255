"""The merchant API: a merchant's own catalog, imports and duplicate report.

Every read starts from the request user's merchants (`selectors.*_for_user`): another merchant's product, image,
job or finding is a 404, indistinguishable from one that does not exist. Detail routes also run the object
permission check. Views validate with an input serializer, call one service or selector and render with an
output serializer.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors
from catalog.api.permissions import IsMerchantUser
from catalog.intake import IntakeError
from catalog.intake.images import MAX_IMAGE_BYTES
from catalog.intake.manifests import MAX_ATTRIBUTES_PER_ROW, MAX_MANIFEST_BYTES
from catalog.models import DuplicateFinding, ImageFetch, ImportJob, Merchant, Product, ProductImage
from catalog.services import imports, products


class MerchantPagination(LimitOffsetPagination):
    default_limit = 50  # a page of a merchant's table
    max_limit = 500  # keeps one response under a few hundred kB


PAGE_PARAMETERS = [
    OpenApiParameter("limit", int, description=f"rows per page (default {MerchantPagination.default_limit}, "
                     f"at most {MerchantPagination.max_limit})"),
    OpenApiParameter("offset", int, description="rows to skip"),
]  # fmt: skip


def page_of(item: type[serializers.Serializer]) -> type[serializers.Serializer]:
    """The schema of a MerchantPagination page of `item`: these are APIViews, which drf-spectacular does not see
    paginate (it would document a bare list)."""
    name = item.__name__.removesuffix("Serializer").removesuffix("Output")
    fields = {
        "count": serializers.IntegerField(),
        "next": serializers.URLField(allow_null=True),
        "previous": serializers.URLField(allow_null=True),
        "results": item(many=True),
    }
    return type(f"Paginated{name}ListSerializer", (serializers.Serializer,), fields)


# --- serializers -----------------------------------------------------------------------------------------------


class MerchantOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Merchant
        fields = ["id", "name", "slug"]
        read_only_fields = fields


class ImageOutputSerializer(serializers.ModelSerializer):
    file = serializers.SerializerMethodField()
    source_url = serializers.CharField(help_text="where the image was fetched from; empty for an uploaded file")

    class Meta:
        model = ProductImage
        fields = ["id", "file", "position", "status", "error", "embed_attempts", "width", "height", "sha256",
                  "source_url", "created_at"]  # fmt: skip
        read_only_fields = fields
        extra_kwargs = {
            "embed_attempts": {
                "help_text": "embedding deliveries that began on this image and have not finished; at the cap "
                "(EMBED_MAX_ATTEMPTS) it is failed: retry it with POST .../retry/ or upload the file again"
            }
        }

    def get_file(self, image: ProductImage) -> str:
        return image.file.url if image.file else ""


class ImageFetchOutputSerializer(serializers.ModelSerializer):
    image = ImageOutputSerializer(read_only=True, allow_null=True)
    status_url = serializers.SerializerMethodField(help_text="poll this until state is done or failed")

    class Meta:
        model = ImageFetch
        fields = ["id", "product", "url", "position", "state", "error", "image", "status_url", "created_at",
                  "finished_at"]  # fmt: skip
        read_only_fields = fields

    def get_status_url(self, fetch: ImageFetch) -> str:
        return reverse("api:merchant-image-fetch-detail", args=[fetch.pk])


class ProductOutputSerializer(serializers.ModelSerializer):
    merchant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    images = ImageOutputSerializer(many=True, read_only=True)
    url = serializers.CharField(help_text="the product's page; may be empty")  # a model URLField: "" is no "uri"

    class Meta:
        model = Product
        fields = [
            "id",
            "merchant",
            "sku",
            "title",
            "description",
            "category",
            "attributes",
            "price",
            "url",
            "active",
            "images",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class ProductFieldsSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=300)
    description = serializers.CharField(allow_blank=True, required=False, max_length=20_000)
    category = serializers.CharField(allow_blank=True, required=False, max_length=100)
    attributes = serializers.ListField(
        child=serializers.CharField(max_length=100), required=False, max_length=MAX_ATTRIBUTES_PER_ROW
    )
    price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, allow_null=True, required=False)
    url = serializers.URLField(allow_blank=True, required=False, max_length=1000)
    active = serializers.BooleanField(required=False)


class ProductCreateInputSerializer(ProductFieldsSerializer):
    merchant = serializers.SlugField(required=False, help_text="the merchant's slug; needed if you act for several")
    sku = serializers.CharField(max_length=100)


class ProductListInputSerializer(serializers.Serializer):
    merchant = serializers.SlugField(required=False)
    active = serializers.BooleanField(required=False, allow_null=True, default=None)
    category = serializers.CharField(required=False, default="")
    q = serializers.CharField(required=False, default="", max_length=100)


class ImageAddInputSerializer(serializers.Serializer):
    file = serializers.FileField(required=False)
    url = serializers.URLField(required=False, max_length=2000)
    position = serializers.IntegerField(required=False, default=0, min_value=0, max_value=100)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if bool(attrs.get("file")) == bool(attrs.get("url")):
            raise ValidationError("give exactly one of file or url")
        return attrs


class ImportCreateInputSerializer(serializers.Serializer):
    merchant = serializers.SlugField(required=False)
    manifest = serializers.FileField(
        help_text="CSV or JSON lines: sku, title, category, attributes, price, url, images"
    )
    images = serializers.FileField(required=False, help_text="a zip of the image files the manifest names")
    format = serializers.ChoiceField(choices=ImportJob.Format.choices, required=False)


class ProgressOutputSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    processed = serializers.IntegerField()
    ok = serializers.IntegerField()
    rejected = serializers.IntegerField()
    percent = serializers.FloatField()
    rows_per_second = serializers.FloatField(allow_null=True)
    eta_seconds = serializers.FloatField(allow_null=True)
    images_new = serializers.IntegerField()
    images_pending = serializers.IntegerField()


class ImportJobOutputSerializer(serializers.ModelSerializer):
    merchant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    progress = serializers.SerializerMethodField()

    class Meta:
        model = ImportJob
        fields = [
            "id",
            "merchant",
            "source_name",
            "manifest_format",
            "state",
            "error",
            "total",
            "processed",
            "ok",
            "rejected",
            "progress",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    @extend_schema_field(ProgressOutputSerializer)
    def get_progress(self, job: ImportJob) -> dict[str, Any]:
        return ProgressOutputSerializer(selectors.import_job_progress(job=job)).data


class RejectedRowOutputSerializer(serializers.Serializer):
    line = serializers.IntegerField()
    sku = serializers.CharField()
    error = serializers.CharField()


class DuplicateListInputSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=DuplicateFinding.Kind.choices, required=False, default="")


class DuplicateFindingOutputSerializer(serializers.ModelSerializer):
    image = serializers.SerializerMethodField()
    other = serializers.SerializerMethodField()

    class Meta:
        model = DuplicateFinding
        fields = ["id", "kind", "image", "other", "hamming", "fc7_distance", "created_at"]
        read_only_fields = fields

    def get_image(self, finding: DuplicateFinding) -> dict[str, Any]:
        return {"id": finding.image_id, "product_id": finding.image.product_id, "sku": finding.image.product.sku}

    def get_other(self, finding: DuplicateFinding) -> dict[str, Any] | None:
        """The other listing when it is the merchant's own; another merchant's product is never described."""
        if finding.kind != DuplicateFinding.Kind.DUPLICATE_LISTING:
            return None
        other = finding.other_image
        return {"id": other.pk, "product_id": other.product_id, "sku": other.product.sku}


# --- views --------------------------------------------------------------------------------------------------------


def _acting_merchant(request: Request, slug: str | None) -> Merchant:
    merchant = selectors.merchant_for_user(user=request.user, slug=slug or "")
    if merchant is None:
        if slug:
            raise NotFound("no such merchant for this account")
        raise ValidationError({"merchant": "this account acts for several merchants: name one (its slug)"})
    return merchant


def _paginated(request: Request, view: APIView, items: Any, serializer: type[serializers.BaseSerializer]) -> Response:
    paginator = MerchantPagination()
    page = paginator.paginate_queryset(items, request, view=view)
    return paginator.get_paginated_response(serializer(page, many=True).data)


class MerchantAPIView(APIView):
    permission_classes = [IsMerchantUser]

    def _product(self, request: Request, product_id: int) -> Product:
        product = selectors.product_get_for_user(user=request.user, product_id=product_id)
        if product is None:
            raise NotFound()
        self.check_object_permissions(request, product)
        return product


class MerchantListView(MerchantAPIView):
    @extend_schema(responses=MerchantOutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(MerchantOutputSerializer(selectors.merchants_for_user(user=request.user), many=True).data)


class ProductListView(MerchantAPIView):
    @extend_schema(
        operation_id="merchant_products_list",
        parameters=[ProductListInputSerializer, *PAGE_PARAMETERS],
        responses=page_of(ProductOutputSerializer),
    )
    def get(self, request: Request) -> Response:
        params = ProductListInputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        listed = selectors.product_list_for_user(
            user=request.user,
            merchant_slug=params.validated_data.get("merchant", ""),
            active=params.validated_data["active"],
            category=params.validated_data["category"],
            query=params.validated_data["q"],
        )
        return _paginated(request, self, listed, ProductOutputSerializer)

    @extend_schema(request=ProductCreateInputSerializer, responses=ProductOutputSerializer)
    def post(self, request: Request) -> Response:
        data = ProductCreateInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        merchant = _acting_merchant(request, fields.pop("merchant", None))
        result = products.product_upsert(merchant=merchant, **fields)
        code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return Response(ProductOutputSerializer(result.product).data, status=code)


class ProductDetailView(MerchantAPIView):
    @extend_schema(responses=ProductOutputSerializer)
    def get(self, request: Request, product_id: int) -> Response:
        return Response(ProductOutputSerializer(self._product(request, product_id)).data)

    @extend_schema(request=ProductFieldsSerializer, responses=ProductOutputSerializer)
    def patch(self, request: Request, product_id: int) -> Response:
        product = self._product(request, product_id)
        data = ProductFieldsSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        product = products.product_update(product=product, **data.validated_data)
        return Response(ProductOutputSerializer(product).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, product_id: int) -> Response:
        products.product_delete(product=self._product(request, product_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProductImageListView(MerchantAPIView):
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(responses=ImageOutputSerializer(many=True))
    def get(self, request: Request, product_id: int) -> Response:
        return Response(ImageOutputSerializer(self._product(request, product_id).images.all(), many=True).data)

    @extend_schema(
        request=ImageAddInputSerializer,
        responses={201: ImageOutputSerializer, 200: ImageOutputSerializer, 202: ImageFetchOutputSerializer},
        description="A file is validated and stored at once (201; 200 if the product already had it). A url is "
        "fetched by a worker: 202 with an image fetch to poll at its status_url until it is done (with the image) "
        "or failed (with the reason).",
    )
    def post(self, request: Request, product_id: int) -> Response:
        product = self._product(request, product_id)
        data = ImageAddInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        upload = data.validated_data.get("file")
        if upload is None:  # by URL: a slow image host must not hold this web thread
            fetch = products.image_fetch_request(
                product=product, url=data.validated_data["url"], position=data.validated_data["position"]
            )
            return Response(ImageFetchOutputSerializer(fetch).data, status=status.HTTP_202_ACCEPTED)
        if upload.size > MAX_IMAGE_BYTES:
            raise ValidationError({"file": f"the image is larger than {MAX_IMAGE_BYTES:,} bytes"})
        try:
            result = products.product_image_add(
                product=product, data=upload.read(), position=data.validated_data["position"]
            )
        except IntakeError as exc:
            raise ValidationError({"detail": str(exc)}) from exc
        code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return Response(ImageOutputSerializer(result.image).data, status=code)


class ProductImageDetailView(MerchantAPIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, product_id: int, image_id: int) -> Response:
        image = selectors.image_get_for_user(user=request.user, product_id=product_id, image_id=image_id)
        if image is None:
            raise NotFound()
        self.check_object_permissions(request, image)
        products.image_delete(image=image)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ImageNotRetryable(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "not_failed"


class ProductImageRetryView(MerchantAPIView):
    @extend_schema(
        request=None,
        responses={
            202: ImageOutputSerializer,
            409: OpenApiResponse(description="the image has not failed (pending or embedded): nothing to retry"),
        },
        description="Embed a failed image again (its file did not decode, or the worker died on it too often): it "
        "is pending again, with its attempt count cleared, and queued (202). An image that has not failed: 409.",
    )
    def post(self, request: Request, product_id: int, image_id: int) -> Response:
        image = selectors.image_get_for_user(user=request.user, product_id=product_id, image_id=image_id)
        if image is None:
            raise NotFound()
        self.check_object_permissions(request, image)
        try:
            image = products.image_embed_retry(image=image)
        except products.ImageNotFailed as exc:
            raise ImageNotRetryable(str(exc)) from exc
        return Response(ImageOutputSerializer(image).data, status=status.HTTP_202_ACCEPTED)


class ImageFetchDetailView(MerchantAPIView):
    @extend_schema(responses=ImageFetchOutputSerializer)
    def get(self, request: Request, fetch_id: int) -> Response:
        fetch = selectors.image_fetch_get_for_user(user=request.user, fetch_id=fetch_id)
        if fetch is None:
            raise NotFound()
        self.check_object_permissions(request, fetch)
        return Response(ImageFetchOutputSerializer(fetch).data)


class ImportJobListView(MerchantAPIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        operation_id="merchant_imports_list", parameters=PAGE_PARAMETERS, responses=page_of(ImportJobOutputSerializer)
    )
    def get(self, request: Request) -> Response:
        return _paginated(
            request, self, selectors.import_job_list_for_user(user=request.user), ImportJobOutputSerializer
        )

    @extend_schema(request=ImportCreateInputSerializer, responses={202: ImportJobOutputSerializer})
    def post(self, request: Request) -> Response:
        data = ImportCreateInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        merchant = _acting_merchant(request, data.validated_data.get("merchant"))
        manifest = data.validated_data["manifest"]
        if manifest.size > MAX_MANIFEST_BYTES:
            raise ValidationError({"manifest": f"the manifest is larger than {MAX_MANIFEST_BYTES:,} bytes"})
        try:
            with transaction.atomic():
                job = imports.import_job_create(
                    merchant=merchant,
                    manifest=manifest.read(),
                    manifest_name=manifest.name or "",
                    manifest_format=data.validated_data.get("format"),
                    archive=data.validated_data.get("images"),
                    created_by=request.user,
                )
        except IntakeError as exc:
            raise ValidationError({"detail": str(exc)}) from exc
        return Response(ImportJobOutputSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class ImportJobDetailView(MerchantAPIView):
    def _job(self, request: Request, job_id: int) -> ImportJob:
        job = selectors.import_job_get_for_user(user=request.user, job_id=job_id)
        if job is None:
            raise NotFound()
        self.check_object_permissions(request, job)
        return job

    @extend_schema(responses=ImportJobOutputSerializer)
    def get(self, request: Request, job_id: int) -> Response:
        return Response(ImportJobOutputSerializer(self._job(request, job_id)).data)


class ImportJobRejectedView(ImportJobDetailView):
    @extend_schema(
        operation_id="merchant_imports_rejected_list",
        parameters=PAGE_PARAMETERS,
        responses=page_of(RejectedRowOutputSerializer),
    )
    def get(self, request: Request, job_id: int) -> Response:
        rows = selectors.import_job_rejected_rows(job=self._job(request, job_id))
        return _paginated(request, self, rows, RejectedRowOutputSerializer)


class DuplicateListView(MerchantAPIView):
    @extend_schema(
        operation_id="merchant_duplicates_list",
        parameters=[DuplicateListInputSerializer, *PAGE_PARAMETERS],
        responses=page_of(DuplicateFindingOutputSerializer),
    )
    def get(self, request: Request) -> Response:
        params = DuplicateListInputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        findings = selectors.duplicate_findings_for_user(user=request.user, kind=params.validated_data["kind"])
        return _paginated(request, self, findings, DuplicateFindingOutputSerializer)
