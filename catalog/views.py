"""Server-rendered pages for shoppers."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from catalog import selectors


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "catalog/home.html", {"active_version": selectors.model_version_active()})
