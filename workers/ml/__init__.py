"""The multi-task FashionNet-style network and everything around it.

Pure torch/timm/numpy (and the torch-free `inference` package it builds on): nothing in this package imports
Django, Celery or the catalog app, so it can be used (training, evaluation, encoding) on any machine with the ML
dependencies, and a test proves it.

A library with four command modules on top (`python -m workers.ml.<command>`: argument parsing, printing):
`train`, `evaluate`, `benchmark`, `onnx_export`. No library module imports a command module and library
modules import each other without a circle (tests/ml/test_boundaries.py). The library's entry points:

- `training`: TrainConfig (the training defaults; `from_overrides`), `train`, `train_stages`
- `evaluation`: retrieval and head metrics, `evaluate_encoder`, the per-epoch `retrieval_validator`
- `datasets.factory`: training data (`build_dataset`) and evaluation sets by name; `recipes`: named recipes
- `encoder`: `Encoder`, `Encoding`; `heads`: the network of either checkpoint kind; `baseline`: version 0
- `export`: ONNX export (`export`, `is_current_export`); the runner of exported files is the torch-free
  `inference` package (inference.onnx_runtime), which web processes use too
"""
