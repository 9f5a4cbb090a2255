"""Writes, split by entity: the one place where catalog rows change. Keyword-only and typed; views, admin actions,
management commands and worker tasks call them (reads are in catalog.selectors).

    products        products and their images, one at a time (merchant API, admin, demo catalog)
    imports         catalog uploads: import jobs and their chunks, manifest rows to products and images
    embeddings      embeddings of images under a model version, and the duplicate report they feed
    model_versions  version 0's bootstrap, fitted versions, indexing the catalog and the atomic switch
    training        retraining runs started from the admin
    golden          the golden set: shopper photos of known products, and each version's numbers on it
    maintenance     periodic clean-up: orphaned media files, the index change log

Callers import the submodule they need (`from catalog.services import products`).
"""
