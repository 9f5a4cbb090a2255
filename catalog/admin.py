from django.contrib import admin

from catalog.models import (
    ImageEmbedding,
    ImportJob,
    Merchant,
    ModelVersion,
    Product,
    ProductImage,
    TrainingRun,
)


@admin.register(Merchant)
class MerchantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["users"]


class ProductImageInline(admin.TabularInline):
    model = ProductImage
    extra = 0
    fields = ["file", "position", "status", "error", "sha256"]
    readonly_fields = ["sha256", "status", "error"]


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "title", "merchant", "category", "price", "active", "updated_at"]
    list_filter = ["active", "merchant", "category"]
    search_fields = ["sku", "title"]
    list_select_related = ["merchant"]
    inlines = [ProductImageInline]


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "status", "code_bits", "fc7_dim", "created_at", "activated_at"]
    list_filter = ["status", "kind"]
    readonly_fields = ["created_at", "activated_at"]


@admin.register(ImageEmbedding)
class ImageEmbeddingAdmin(admin.ModelAdmin):
    list_display = ["id", "image", "model_version", "category", "category_confidence", "created_at"]
    list_filter = ["model_version"]
    raw_id_fields = ["image", "product"]
    exclude = ["code", "fc7"]


@admin.register(ImportJob)
class ImportJobAdmin(admin.ModelAdmin):
    list_display = ["id", "merchant", "state", "total", "processed", "ok", "rejected", "created_at"]
    list_filter = ["state", "merchant"]


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "state", "progress", "model_version", "created_at", "finished_at"]
    list_filter = ["state"]
