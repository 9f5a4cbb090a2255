"""Server-rendered pages for shoppers. The search page itself is static HTML + JS calling `POST /api/search`."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from catalog import search, selectors


def home(request: HttpRequest) -> HttpResponse:
    """The shopper's visual search page: drop a photo, optionally box the item, filter, see why things matched,
    and (with consent, where the shop keeps shoppers' photos) say which result is the product in the photo."""
    facets = selectors.shop_facets()
    keeping = [merchant for merchant in facets.merchants if merchant.golden_from_shoppers]
    return render(
        request,
        "catalog/home.html",
        {
            "active_version": selectors.model_version_active(),
            "facets": facets,
            "confirm_merchants": [merchant.slug for merchant in keeping],
            "confirm_retention_days": max((merchant.shopper_photo_retention_days for merchant in keeping), default=0),
            "default_k": search.DEFAULT_K,
            "max_k": search.MAX_K,
            "category_modes": search.CATEGORY_MODES,
            "category_mode_default": search.DEFAULT_CATEGORY_MODE,
        },
    )
