"""Running an exported model version without torch: numpy preprocessing, ONNX Runtime, the named `Encoding`.

The one implementation both sides share. A worker's Encoder (workers.ml.encoder) is this package's Encoder plus
torch (checkpoints, live networks); a web process encodes the shopper's photo with this package alone
(catalog.query_encoder), so the photo never travels through the queue and torch never loads in the web.

Imports neither torch, Django, the catalog nor the workers (tests/catalog/test_import_boundaries.py).

- `checkpoint`: what every version file says about itself (format, kinds, vocabularies)
- `preprocess`: letterboxing and normalisation, as numpy arrays
- `encoder`: `Encoder` (load an .onnx export, encode PIL images), `Encoding`, the bits rule and their packing
- `onnx_runtime`: an exported file run by ONNX Runtime, and the checkpoint it was exported from
"""
