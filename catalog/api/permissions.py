"""Merchant API permissions: a merchant user acts only for the merchants it belongs to.

Views fetch objects through user-scoped selectors (another merchant's object is a 404, so ids reveal nothing);
these classes are the second, independent check on every detail route.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from catalog.models import DuplicateFinding, ImageFetch, ImportJob, Product, ProductImage


def merchant_id_of(obj: Any) -> int | None:
    """The merchant that owns an object reachable through the merchant API."""
    if isinstance(obj, Product | ImportJob | DuplicateFinding):
        return obj.merchant_id
    if isinstance(obj, ProductImage | ImageFetch):
        return obj.product.merchant_id
    return None


class IsMerchantUser(BasePermission):
    """Authenticated (token or session) and a member of at least one merchant; owns the object on detail routes."""

    message = "This account does not act for any merchant."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.merchants.exists())

    def has_object_permission(self, request: Request, view: Any, obj: Any) -> bool:
        merchant_id = merchant_id_of(obj)
        return merchant_id is not None and request.user.merchants.filter(pk=merchant_id).exists()
