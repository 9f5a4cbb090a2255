from django.urls import path

from catalog.api import views

app_name = "api"

urlpatterns = [
    path("model-versions/", views.ModelVersionListView.as_view(), name="model-version-list"),
]
