"""Server-rendered pages for shoppers. The search page itself is static HTML + JS calling `POST /api/search`."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from catalog import search, selectors


def home(request: HttpRequest) -> HttpResponse:
    """The shopper's visual search page: drop a photo, optionally box the item, filter, see why things matched."""
    return render(
        request,
        "catalog/home.html",
        {
            "active_version": selectors.model_version_active(),
            "facets": selectors.shop_facets(),
            "default_k": search.DEFAULT_K,
            "max_k": search.MAX_K,
            "category_modes": search.CATEGORY_MODES,
            "category_mode_default": search.DEFAULT_CATEGORY_MODE,
        },
    )
