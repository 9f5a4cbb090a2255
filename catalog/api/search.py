"""Shopper search API: `POST /api/search` (a photo), `GET /api/products/{id}/similar` and `POST /api/search/confirm`
(a shopper's "this is the one" on a result). Anonymous, throttled.

Each view validates with an input serializer, calls one function of `catalog.search`, renders with an output
serializer. No torch here: the photo is encoded on ONNX Runtime in this process, or by a worker on the `search`
queue (catalog.query_encoder). A search slower than settings.SEARCH_SLOW_MS is logged with its stage timings, the
same `timings_ms` the response carries, so a slow stage shows in both.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.http import JsonResponse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import search
from catalog.api.concurrency import SearchBusy, search_slot
from catalog.api.throttling import ClientScopedRateThrottle
from catalog.hamming.candidates import ProductFilter
from catalog.intake import IntakeError
from catalog.intake.images import MAX_IMAGE_BYTES
from catalog.models import Merchant, Product
from catalog.services import golden

logger = logging.getLogger(__name__)


class SearchRateThrottle(ClientScopedRateThrottle):
    """The `search` scope of REST_FRAMEWORK's DEFAULT_THROTTLE_RATES, counted in the shared Redis cache per client
    (an IPv6 client by its /64)."""


# --- input ---------------------------------------------------------------------------------------------------------
class _FilterInputSerializer(serializers.Serializer):
    k = serializers.IntegerField(min_value=1, max_value=search.MAX_K, default=search.DEFAULT_K)
    merchant = serializers.SlugField(required=False, help_text="search only this merchant's catalog (its slug)")
    category = serializers.CharField(required=False, max_length=100, help_text="catalog category, exact")
    attributes = serializers.CharField(
        required=False, max_length=1000, help_text="comma-separated attributes the product must all have"
    )
    price_min = serializers.DecimalField(required=False, max_digits=12, decimal_places=2, min_value=0)
    price_max = serializers.DecimalField(required=False, max_digits=12, decimal_places=2, min_value=0)
    category_mode = serializers.ChoiceField(choices=search.CATEGORY_MODES, default=search.DEFAULT_CATEGORY_MODE)
    radius = serializers.IntegerField(required=False, min_value=0, max_value=1024, help_text="max Hamming distance")
    verify = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,  # absent = the server's SEARCH_VERIFY (a form's absent boolean is not False here)
        help_text="geometric verification (local features + RANSAC) of the top candidates; default: on",
    )
    expansion = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,  # absent = the server's SEARCH_QUERY_EXPANSION
        min_value=0,
        max_value=search.MAX_EXPANSION,
        help_text="query expansion: how many of the first products' images join the query before a second "
        "ranking (0 = off); default: the server's setting",
    )
    item_fusion = serializers.FloatField(
        required=False,
        allow_null=True,
        default=None,  # absent = the server's SEARCH_ITEM_FUSION
        min_value=0,
        max_value=1,
        help_text="a photo search without a box also encodes the photo cropped to its best item box and mixes it in "
        "with this weight (0 = the whole photo alone, 1 = the box alone); default: the server's setting",
    )

    def validate_merchant(self, slug: str) -> int:
        merchant = Merchant.objects.filter(Q(slug=slug)).values_list("pk", flat=True).first()
        if merchant is None:
            raise serializers.ValidationError(f"no merchant {slug!r}")
        return merchant

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        low, high = attrs.get("price_min"), attrs.get("price_max")
        if low is not None and high is not None and low > high:
            raise serializers.ValidationError({"price_max": "must not be below price_min"})
        return attrs

    def options(self) -> search.SearchOptions:
        data = self.validated_data
        attributes = tuple(a.strip() for a in (data.get("attributes") or "").split(",") if a.strip())
        return search.SearchOptions(
            k=data["k"],
            product_filter=ProductFilter(
                merchant_id=data.get("merchant"),
                category=data.get("category") or None,
                attributes=attributes,
                price_min=data.get("price_min"),
                price_max=data.get("price_max"),
            ),
            category_mode=data["category_mode"],
            # no `backend`: the coarse backend is the operator's choice (SEARCH_COARSE_BACKEND); an anonymous
            # `backend=sql` with a price or attribute filter would scan every embedding
            radius=data.get("radius"),
            verify=data.get("verify"),
            expansion=data.get("expansion"),
            item_fusion=data.get("item_fusion"),
        )


class _PhotoInputSerializer(serializers.Serializer):
    """The shopper's photo and optional crop box, as a search and a "this is the one" both take them."""

    image = serializers.FileField(
        help_text="the shopper's photo: JPEG (MPO too), PNG, WebP or GIF (an animation: its first frame)"
    )
    box = serializers.CharField(
        required=False, help_text="optional crop box 'x0,y0,x1,y1' as fractions of the image (0..1)"
    )

    def validate_box(self, value: str) -> tuple[float, float, float, float] | None:
        if not value.strip():
            return None
        try:
            parts = tuple(float(part) for part in value.split(","))
        except ValueError:
            raise serializers.ValidationError("the box is four numbers: x0,y0,x1,y1") from None
        if len(parts) != 4:
            raise serializers.ValidationError("the box is four numbers: x0,y0,x1,y1")
        x0, y0, x1, y1 = parts
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise serializers.ValidationError("the crop box must be x0 < x1 and y0 < y1, all within 0..1")
        return (x0, y0, x1, y1)

    def validate_image(self, upload: Any) -> bytes:
        if upload.size > MAX_IMAGE_BYTES:
            raise serializers.ValidationError(f"the image is {upload.size:,} bytes; the limit is {MAX_IMAGE_BYTES:,}")
        return upload.read()


class SearchInputSerializer(_PhotoInputSerializer, _FilterInputSerializer):
    pass


class ConfirmInputSerializer(_PhotoInputSerializer):
    product = serializers.IntegerField(help_text="the result the shopper says is the product in the photo (its id)")
    consent = serializers.BooleanField(
        help_text="the shopper agrees that the shop keeps this photo (for its retention period) to test new search "
        "models; without it nothing is stored"
    )

    def validate_consent(self, consent: bool) -> bool:
        if not consent:
            raise serializers.ValidationError("the photo is kept only with your consent: nothing was stored")
        return consent


# --- output --------------------------------------------------------------------------------------------------------
class ExplanationOutputSerializer(serializers.Serializer):
    hamming_distance = serializers.IntegerField()
    code_bits = serializers.IntegerField()
    fc7_distance = serializers.FloatField()
    category_predicted = serializers.CharField()
    category_confidence = serializers.FloatField(allow_null=True)
    category_catalog = serializers.CharField()
    category_agrees = serializers.BooleanField(allow_null=True)
    attributes_predicted = serializers.DictField(child=serializers.FloatField())
    attributes_catalog = serializers.ListField(child=serializers.CharField())
    attributes_agreeing = serializers.ListField(child=serializers.CharField())
    query_landmarks = serializers.ListField(child=serializers.ListField(child=serializers.FloatField()))
    result_landmarks = serializers.ListField(child=serializers.ListField(child=serializers.FloatField()))
    query_landmark_box = serializers.ListField(child=serializers.FloatField(), allow_null=True)
    result_landmark_box = serializers.ListField(child=serializers.FloatField(), allow_null=True)
    fine_score = serializers.FloatField(help_text="the fine stage's score, before geometric verification")
    inliers = serializers.IntegerField(allow_null=True, help_text="geometrically consistent matches; null: unverified")
    tentative_matches = serializers.IntegerField(allow_null=True)
    verify_factor = serializers.FloatField(help_text="score = fine_score x verify_factor")


class HitProductOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="pk")
    sku = serializers.CharField()
    title = serializers.CharField()
    category = serializers.CharField()
    attributes = serializers.ListField(child=serializers.CharField())
    price = serializers.DecimalField(max_digits=12, decimal_places=2, allow_null=True)
    url = serializers.CharField()
    merchant = serializers.SlugField(source="merchant_slug")


class HitOutputSerializer(serializers.Serializer):
    rank = serializers.IntegerField()
    score = serializers.FloatField()
    confidence = serializers.FloatField(
        allow_null=True,
        help_text="the probability that this is the product in the photo, calibrated per model version on the "
        "shop's golden set; null when the version has no calibration, and for similar products",
    )
    match = serializers.ChoiceField(
        choices=[golden.EXACT_MATCH, golden.SIMILAR],
        allow_null=True,
        help_text=f"'{golden.EXACT_MATCH}' at a confidence of {golden.EXACT_MATCH_CONFIDENCE:g} or more, else "
        f"'{golden.SIMILAR}'; null with the confidence",
    )
    product = HitProductOutputSerializer()
    image_url = serializers.SerializerMethodField()
    explanation = ExplanationOutputSerializer()

    def get_image_url(self, hit: search.ProductHit) -> str:
        url = hit.image_url
        request = self.context.get("request")
        return request.build_absolute_uri(url) if request is not None else url


class ItemBoxOutputSerializer(serializers.Serializer):
    box = serializers.ListField(
        child=serializers.FloatField(),
        min_length=4,
        max_length=4,
        help_text="x0,y0,x1,y1 as fractions of the photo sent (the whole photo, also when a box was sent): post it "
        "back as `box` to search that item alone",
    )
    score = serializers.FloatField(help_text="how strongly the network responds there, relative to the best (1.0)")

    def to_representation(self, item: list[float]) -> dict[str, Any]:
        return {"box": list(item[:4]), "score": item[4]}


class QueryOutputSerializer(serializers.Serializer):
    category = serializers.CharField()
    category_confidence = serializers.FloatField(allow_null=True)
    category_probs = serializers.DictField(child=serializers.FloatField())
    attributes = serializers.DictField(child=serializers.FloatField())
    landmarks = serializers.ListField(child=serializers.ListField(child=serializers.FloatField()))
    item_boxes = ItemBoxOutputSerializer(
        many=True,
        help_text="the items the network sees in the photo, best first (from its own activation map); empty for a "
        "similar-products query or a model version exported without the map",
    )
    item_fused = serializers.BooleanField(
        help_text="the search mixed the whole photo with its best item box (item_fusion)"
    )


class CoarseOutputSerializer(serializers.Serializer):
    backend = serializers.CharField()
    candidates = serializers.IntegerField()
    radius = serializers.IntegerField()
    exhaustive = serializers.BooleanField()
    rounds = serializers.IntegerField()
    notes = serializers.ListField(child=serializers.CharField())


class SearchOutputSerializer(serializers.Serializer):
    model_version = serializers.SerializerMethodField()
    query = QueryOutputSerializer()
    results = HitOutputSerializer(source="hits", many=True)
    coarse = CoarseOutputSerializer()
    timings_ms = serializers.DictField(child=serializers.FloatField())

    def get_model_version(self, result: search.SearchResult) -> dict[str, Any]:
        return {"id": result.version.pk, "name": result.version.name, "code_bits": result.version.code_bits}


class ErrorOutputSerializer(serializers.Serializer):
    detail = serializers.CharField()


# A 400 is {"detail": ...} (the photo could not be read) or DRF's field errors, {"box": ["..."], ...}.
BAD_REQUEST_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "additionalProperties": {"type": "array", "items": {"type": "string"}},
}


# --- views ---------------------------------------------------------------------------------------------------------
class _ShopperView(APIView):
    authentication_classes: list = []  # anonymous: no session, so no CSRF token needed by the shop's own page
    permission_classes = [AllowAny]
    throttle_classes = [SearchRateThrottle]
    throttle_scope = "search"

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Hold one of the process's search slots for the whole request; none free within SEARCH_SLOT_WAIT_MS: 503
        with Retry-After."""
        try:
            with search_slot().slot(wait_s=settings.SEARCH_SLOT_WAIT_MS / 1000):
                return super().dispatch(request, *args, **kwargs)
        except SearchBusy as exc:
            response = JsonResponse({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
            response["Retry-After"] = str(exc.retry_after_s)
            return response


def _answer(route: str, result: search.SearchResult, request: Request) -> Response:
    """The rendered result; a search slower than SEARCH_SLOW_MS is logged with its stages first."""
    total = result.timings_ms.get("total", 0.0)
    if total > settings.SEARCH_SLOW_MS:
        logger.warning(
            "slow search: %s took %.0f ms (SEARCH_SLOW_MS %.0f), version %s, %d candidates; stages (ms) %s",
            route, total, settings.SEARCH_SLOW_MS, result.version.pk, result.coarse.candidates,
            json.dumps(result.timings_ms),
        )  # fmt: skip
    return Response(SearchOutputSerializer(result, context={"request": request}).data)


def _unavailable(exc: Exception) -> Response:
    return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)


class SearchView(_ShopperView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        request={"multipart/form-data": SearchInputSerializer},
        responses={200: SearchOutputSerializer, 400: BAD_REQUEST_SCHEMA, 503: ErrorOutputSerializer},
        summary="Find the products in a photo",
    )
    def post(self, request: Request) -> Response:
        params = SearchInputSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        try:
            result = search.search_photo(
                data=params.validated_data["image"], box=params.validated_data.get("box"), options=params.options()
            )
        except IntakeError as exc:
            return Response({"detail": f"invalid image: {exc}"}, status=status.HTTP_400_BAD_REQUEST)
        except search.SearchUnavailable as exc:
            return _unavailable(exc)
        _keep_sample(params.validated_data)
        return _answer("photo search", result, request)


def _keep_sample(data: dict[str, Any]) -> None:
    """A share of searches joins the recent-query sample where the shop allows it; the shopper's answer never
    depends on it."""
    try:
        golden.recent_query_keep(photo=data["image"], box=data.get("box"), merchant_id=data.get("merchant"))
    except Exception:
        logger.exception("could not keep a recent query sample")


class SimilarProductsView(_ShopperView):
    parser_classes = [JSONParser]

    @extend_schema(
        parameters=[_FilterInputSerializer],
        responses={
            200: SearchOutputSerializer,
            400: BAD_REQUEST_SCHEMA,
            404: ErrorOutputSerializer,
            503: ErrorOutputSerializer,
        },
        summary="Products that look like this one",
    )
    def get(self, request: Request, product_id: int) -> Response:
        params = _FilterInputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        try:
            result = search.similar_products(product_id=product_id, options=params.options())
        except search.ProductNotSearchable as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_404_NOT_FOUND)
        except search.SearchUnavailable as exc:
            return _unavailable(exc)
        return _answer("similar products", result, request)


class ConfirmRateThrottle(ClientScopedRateThrottle):
    """The `confirm` scope: each "this is the one" stores a photo, so far fewer than searches per client."""


class ConfirmView(APIView):
    """A shopper's "this is the one" on a result: with their consent, and where the product's shop keeps shoppers'
    photos (Merchant.golden_from_shoppers), the photo joins the shop's golden set for its retention period. Nothing
    is returned about stored photos: only staff see them, in the admin."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [ConfirmRateThrottle]
    throttle_scope = "confirm"
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        request={"multipart/form-data": ConfirmInputSerializer},
        responses={
            201: ErrorOutputSerializer,
            400: BAD_REQUEST_SCHEMA,
            403: ErrorOutputSerializer,
            404: ErrorOutputSerializer,
        },
        summary="Mark a result as the product in the photo (kept only with consent, where the shop allows it)",
    )
    def post(self, request: Request) -> Response:
        params = ConfirmInputSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        try:
            golden.golden_query_from_shopper(
                product_id=data["product"], photo=data["image"], consent=data["consent"], box=data.get("box")
            )
        except Product.DoesNotExist:
            return Response({"detail": f"no product {data['product']}"}, status=status.HTTP_404_NOT_FOUND)
        except golden.ShopperPhotoRefused as exc:
            return Response({"detail": f"{exc}: nothing was stored"}, status=status.HTTP_403_FORBIDDEN)
        except IntakeError as exc:
            return Response({"detail": f"invalid image: {exc}"}, status=status.HTTP_400_BAD_REQUEST)
        return Response({"detail": "thank you: the shop will test new search models with your photo"}, status=201)
