from rest_framework import serializers

from catalog.models import ModelVersion


class ModelVersionOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "name",
            "kind",
            "status",
            "code_bits",
            "fc7_dim",
            "metrics",
            "created_at",
            "activated_at",
        ]
        read_only_fields = fields
