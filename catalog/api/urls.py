from django.urls import path

from catalog.api import auth, merchants, views
from catalog.api import search as shopper_search

app_name = "api"

urlpatterns = [
    path("model-versions/", views.ModelVersionListView.as_view(), name="model-version-list"),
    # Shopper search (anonymous, throttled)
    path("search", shopper_search.SearchView.as_view(), name="search"),
    path("search/confirm", shopper_search.ConfirmView.as_view(), name="search-confirm"),
    path("products/<int:product_id>/similar", shopper_search.SimilarProductsView.as_view(), name="product-similar"),
    # Merchant API (token or session auth; everything scoped to the user's merchants)
    path("auth/token/", auth.ThrottledObtainAuthToken.as_view(), name="auth-token"),
    path("merchant/merchants/", merchants.MerchantListView.as_view(), name="merchant-list"),
    path("merchant/products/", merchants.ProductListView.as_view(), name="merchant-product-list"),
    path("merchant/products/<int:product_id>/", merchants.ProductDetailView.as_view(), name="merchant-product-detail"),
    path(
        "merchant/products/<int:product_id>/images/",
        merchants.ProductImageListView.as_view(),
        name="merchant-product-images",
    ),
    path(
        "merchant/products/<int:product_id>/images/<int:image_id>/",
        merchants.ProductImageDetailView.as_view(),
        name="merchant-product-image-detail",
    ),
    path(
        "merchant/products/<int:product_id>/images/<int:image_id>/retry/",
        merchants.ProductImageRetryView.as_view(),
        name="merchant-product-image-retry",
    ),
    path(
        "merchant/image-fetches/<int:fetch_id>/",
        merchants.ImageFetchDetailView.as_view(),
        name="merchant-image-fetch-detail",
    ),
    path("merchant/imports/", merchants.ImportJobListView.as_view(), name="merchant-import-list"),
    path("merchant/imports/<int:job_id>/", merchants.ImportJobDetailView.as_view(), name="merchant-import-detail"),
    path(
        "merchant/imports/<int:job_id>/rejected/",
        merchants.ImportJobRejectedView.as_view(),
        name="merchant-import-rejected",
    ),
    path("merchant/duplicates/", merchants.DuplicateListView.as_view(), name="merchant-duplicate-list"),
]
