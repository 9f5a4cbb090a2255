"""Database triggers that feed catalog_indexchange, the change sequence the in-memory coarse indexes follow.

Triggers rather than service code: bulk deletes, cascades from a deleted merchant or product and the admin all
write the change too, so an index can never miss a deletion.
"""

from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION catalog_embedding_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO catalog_indexchange (op, embedding_id, product_id, model_version_id, created_at)
        VALUES ('embedding', OLD.id, OLD.product_id, OLD.model_version_id, now());
        RETURN OLD;
    END IF;
    INSERT INTO catalog_indexchange (op, embedding_id, product_id, model_version_id, created_at)
    VALUES ('embedding', NEW.id, NEW.product_id, NEW.model_version_id, now());
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER catalog_embedding_changed
AFTER INSERT OR UPDATE OF code, product_id, model_version_id OR DELETE ON catalog_imageembedding
FOR EACH ROW EXECUTE FUNCTION catalog_embedding_changed();

CREATE OR REPLACE FUNCTION catalog_product_visibility_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO catalog_indexchange (op, product_id, created_at) VALUES ('product', OLD.id, now());
        RETURN OLD;
    END IF;
    IF NEW.active IS DISTINCT FROM OLD.active THEN
        INSERT INTO catalog_indexchange (op, product_id, created_at) VALUES ('product', NEW.id, now());
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER catalog_product_visibility_changed
AFTER UPDATE OF active OR DELETE ON catalog_product
FOR EACH ROW EXECUTE FUNCTION catalog_product_visibility_changed();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS catalog_product_visibility_changed ON catalog_product;
DROP FUNCTION IF EXISTS catalog_product_visibility_changed();
DROP TRIGGER IF EXISTS catalog_embedding_changed ON catalog_imageembedding;
DROP FUNCTION IF EXISTS catalog_embedding_changed();
"""


class Migration(migrations.Migration):
    dependencies = [("catalog", "0001_initial")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
