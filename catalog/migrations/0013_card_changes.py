"""The change log also records changes of what a search result card shows (op "card"), so that each web process
can keep the cards of its results in memory (catalog.hamming.cards) and still show a changed title, price, image
or shop at once: a product's card fields, an image's file or product, an embedding's image or landmarks (its code,
product and version are logged already), and a merchant's slug (a change for every card: product and embedding
ids are left empty). The memory index's replay moves no code for these rows; it only drops the cards concerned."""

from django.db import migrations, models

FORWARD = """
CREATE OR REPLACE FUNCTION catalog_product_card_changed() RETURNS trigger AS $$
BEGIN
    IF (NEW.merchant_id, NEW.sku, NEW.title, NEW.category, NEW.attributes, NEW.price, NEW.url)
       IS DISTINCT FROM (OLD.merchant_id, OLD.sku, OLD.title, OLD.category, OLD.attributes, OLD.price, OLD.url) THEN
        INSERT INTO catalog_indexchange (op, product_id, created_at) VALUES ('card', NEW.id, now());
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER catalog_product_card_changed
AFTER UPDATE OF merchant_id, sku, title, category, attributes, price, url ON catalog_product
FOR EACH ROW EXECUTE FUNCTION catalog_product_card_changed();

CREATE OR REPLACE FUNCTION catalog_image_card_changed() RETURNS trigger AS $$
BEGIN
    IF (NEW.file, NEW.product_id) IS DISTINCT FROM (OLD.file, OLD.product_id) THEN
        INSERT INTO catalog_indexchange (op, product_id, created_at) VALUES ('card', OLD.product_id, now());
        IF NEW.product_id IS DISTINCT FROM OLD.product_id THEN
            INSERT INTO catalog_indexchange (op, product_id, created_at) VALUES ('card', NEW.product_id, now());
        END IF;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER catalog_image_card_changed
AFTER UPDATE OF file, product_id ON catalog_productimage
FOR EACH ROW EXECUTE FUNCTION catalog_image_card_changed();

CREATE OR REPLACE FUNCTION catalog_embedding_card_changed() RETURNS trigger AS $$
BEGIN
    IF (NEW.image_id, NEW.landmarks) IS DISTINCT FROM (OLD.image_id, OLD.landmarks) THEN
        INSERT INTO catalog_indexchange (op, embedding_id, product_id, model_version_id, created_at)
        VALUES ('card', NEW.id, NEW.product_id, NEW.model_version_id, now());
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER catalog_embedding_card_changed
AFTER UPDATE OF image_id, landmarks ON catalog_imageembedding
FOR EACH ROW EXECUTE FUNCTION catalog_embedding_card_changed();

CREATE OR REPLACE FUNCTION catalog_merchant_card_changed() RETURNS trigger AS $$
BEGIN
    IF NEW.slug IS DISTINCT FROM OLD.slug THEN
        INSERT INTO catalog_indexchange (op, created_at) VALUES ('card', now());
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER catalog_merchant_card_changed
AFTER UPDATE OF slug ON catalog_merchant
FOR EACH ROW EXECUTE FUNCTION catalog_merchant_card_changed();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS catalog_merchant_card_changed ON catalog_merchant;
DROP FUNCTION IF EXISTS catalog_merchant_card_changed();
DROP TRIGGER IF EXISTS catalog_embedding_card_changed ON catalog_imageembedding;
DROP FUNCTION IF EXISTS catalog_embedding_card_changed();
DROP TRIGGER IF EXISTS catalog_image_card_changed ON catalog_productimage;
DROP FUNCTION IF EXISTS catalog_image_card_changed();
DROP TRIGGER IF EXISTS catalog_product_card_changed ON catalog_product;
DROP FUNCTION IF EXISTS catalog_product_card_changed();
"""


class Migration(migrations.Migration):
    dependencies = [("catalog", "0012_embed_attempts")]

    operations = [
        migrations.AlterField(
            model_name="indexchange",
            name="op",
            field=models.CharField(
                choices=[
                    ("embedding", "Embedding"),
                    ("product", "Product"),
                    ("card", "Card"),
                ],
                max_length=16,
            ),
        ),
        migrations.RunSQL(FORWARD, BACKWARD),
    ]
