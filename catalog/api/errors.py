"""Error pages for the API's paths: a URL under /api/ that matches no route (a product id that is not a number,
a typo) answers like every other API error, `{"detail": ...}` in JSON, not with the site's HTML page."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

API_PREFIX = "/api/"


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if request.path.startswith(API_PREFIX):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)
