"""Request bodies are capped per route before Django spools them.

Without this, Django reads a multipart body to the end (to memory, then to a temporary file past
FILE_UPLOAD_MAX_MEMORY_SIZE) before a view can look at a file's size: a 10 GB "photo" costs 10 GB of disk and the
minutes it takes to upload. Two checks stop it:

- `RequestBodyLimitMiddleware` answers 413 from the `Content-Length` header alone, before anything reads the body;
- `CappedUploadHandler`, the first upload handler of every request, counts the bytes that actually stream in and
  aborts with 413 once a file field passes its own cap or the body passes the route's: a body whose length was not
  declared (a chunked upload through a server that passes it on) or a multipart body whose one file is larger than
  its field allows while the whole body is within the route's cap.

(Under WSGI, Django reads only `Content-Length` bytes of a body: a chunked body without it reaches a view empty, so
nothing is spooled at all; the handler's total count still covers any server or handler that passes one on.)

The caps are settings (environment variables, see shop_search/settings.py): the route's files plus
FORM_OVERHEAD_BYTES for the multipart framing and the form's small fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import Resolver404, resolve
from rest_framework import status
from rest_framework.exceptions import APIException

from catalog.intake.images import MAX_IMAGE_BYTES
from catalog.intake.manifests import MAX_MANIFEST_BYTES

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers and a form's small fields


class BodyTooLarge(APIException):
    """413: the body, or one file in it, is larger than the route accepts. A DRF view renders it itself; the
    middleware answers it for every other view (the admin)."""

    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"


@dataclass(frozen=True)
class BodyLimit:
    total: int  # bytes of the whole body
    files: dict[str, int] = field(default_factory=dict)  # bytes of one file, by form field name
    what: str = "this route"  # for the message


def _image_limit(what: str, *fields: str) -> BodyLimit:
    return BodyLimit(MAX_IMAGE_BYTES + FORM_OVERHEAD_BYTES, dict.fromkeys(fields, MAX_IMAGE_BYTES), what)


def route_limits() -> dict[str, BodyLimit]:
    """URL name -> its cap; read from settings on each call (tests override them)."""
    zip_cap = settings.IMPORT_ZIP_MAX_BYTES
    import_limit = BodyLimit(
        MAX_MANIFEST_BYTES + zip_cap + FORM_OVERHEAD_BYTES,
        {"manifest": MAX_MANIFEST_BYTES, "images": zip_cap},
        "a catalog import (manifest and zip of images)",
    )
    return {
        "api:search": _image_limit("a search photo", "image"),
        "api:merchant-product-images": _image_limit("a product image", "file"),
        "api:merchant-import-list": import_limit,
        "admin:catalog_importjob_upload": import_limit,
        "admin:catalog_goldenquery_add": _image_limit("a golden query photo", "photo"),
        # one image per save of a product's page (its inline's file fields): more images, more saves
        "admin:catalog_product_add": _image_limit("a product's page with an image"),
        "admin:catalog_product_change": _image_limit("a product's page with an image"),
    }


def body_limit_for(path: str) -> BodyLimit:
    try:
        name = resolve(path).view_name
    except Resolver404:
        name = ""
    default = BodyLimit(settings.REQUEST_BODY_MAX_BYTES, {}, "this route")
    return route_limits().get(name, default)


def _too_large(limit: BodyLimit, size: int | None = None, field_name: str = "") -> str:
    if field_name:
        return f"the file {field_name!r} is larger than {limit.files[field_name]:,} bytes, the limit for {limit.what}"
    shown = f"{size:,} bytes" if size is not None else "larger"
    return f"the request body is {shown}; {limit.what} accepts at most {limit.total:,} bytes"


class CappedUploadHandler(FileUploadHandler):
    """Counts a multipart body's file bytes as they stream and stops the upload (413) past a cap, before the
    next handler (memory or temporary file) has kept them."""

    def __init__(self, request: HttpRequest | None = None, *, limit: BodyLimit) -> None:
        super().__init__(request)
        self.limit = limit
        self.total = 0
        self.in_file = 0

    def new_file(self, field_name: str, *args: object, **kwargs: object) -> None:
        super().new_file(field_name, *args, **kwargs)
        self.in_file = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.total += len(raw_data)
        self.in_file += len(raw_data)
        field_cap = self.limit.files.get(self.field_name)
        if field_cap is not None and self.in_file > field_cap:
            raise BodyTooLarge(_too_large(self.limit, field_name=self.field_name))
        if self.total > self.limit.total:
            raise BodyTooLarge(_too_large(self.limit))
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler makes the file


class RequestBodyLimitMiddleware:
    """First in MIDDLEWARE after security: refuses a declared oversized body with 413 before anything reads it,
    and puts CappedUploadHandler in front of the request's upload handlers."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = body_limit_for(request.path_info)
        declared = request.META.get("CONTENT_LENGTH") or ""
        if declared.strip().isdigit() and int(declared) > limit.total:
            return JsonResponse({"detail": _too_large(limit, int(declared))}, status=413)
        request.upload_handlers.insert(0, CappedUploadHandler(request, limit=limit))
        if request.method == "POST" and request.content_type == "multipart/form-data":
            # Parse the form here, through the capped handler: the first to read it may be another middleware
            # (CSRF reads request.POST), whose exception Django would answer with a 500, not this 413. DRF views
            # then take the parsed form (request.POST and request.FILES) as it is.
            try:
                request.POST  # noqa: B018
            except BodyTooLarge as exc:
                return JsonResponse({"detail": str(exc.detail)}, status=413)
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, BodyTooLarge):  # raised while a non-DRF view (the admin) read request.FILES
            return JsonResponse({"detail": str(exception.detail)}, status=413)
        return None
