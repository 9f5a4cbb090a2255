"""API views: validate with an input serializer, call one service or selector, render with an output serializer."""

from drf_spectacular.utils import extend_schema
from rest_framework import permissions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from catalog import selectors
from catalog.api.serializers import ModelVersionOutputSerializer


class ModelVersionListView(APIView):
    permission_classes = [permissions.IsAdminUser]

    @extend_schema(responses=ModelVersionOutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        versions = selectors.model_version_list()
        return Response(ModelVersionOutputSerializer(versions, many=True).data)
