# One model version indexes at a time: a partial unique index, so two switches started at once cannot both start.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("catalog", "0005_image_keypoints"),
    ]

    operations = [
        migrations.AddConstraint(
            model_name="modelversion",
            constraint=models.UniqueConstraint(
                condition=models.Q(("status", "indexing")), fields=("status",), name="one_indexing_model_version"
            ),
        ),
    ]
