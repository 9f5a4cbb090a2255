import django.db.models.deletion
from django.db import migrations, models

import catalog.models


class Migration(migrations.Migration):
    dependencies = [
        ("catalog", "0006_one_indexing_model_version"),
    ]

    operations = [
        migrations.AddField(
            model_name="trainingrun",
            name="cancel_requested",
            field=models.BooleanField(default=False),
        ),
        migrations.AlterField(
            model_name="trainingrun",
            name="state",
            field=models.CharField(
                choices=[
                    ("pending", "Pending"),
                    ("running", "Running"),
                    ("done", "Done"),
                    ("failed", "Failed"),
                    ("cancelled", "Cancelled"),
                ],
                default="pending",
                max_length=16,
            ),
        ),
        migrations.CreateModel(
            name="GoldenQuery",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "photo",
                    models.ImageField(storage=catalog.models.golden_query_storage, upload_to="golden/%Y/%m/"),
                ),
                (
                    "source",
                    models.CharField(
                        choices=[("admin", "added by an admin"), ("shopper", "a shopper's confirmed result")],
                        default="admin",
                        max_length=16,
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "product",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="golden_queries",
                        to="catalog.product",
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "golden queries",
                "ordering": ["-created_at", "-id"],
            },
        ),
    ]
