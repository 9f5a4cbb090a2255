"""The multi-task FashionNet-style network and everything around it.

Pure torch/timm/numpy: nothing in this package imports Django, Celery or the catalog app, so it can be used
(training, evaluation, encoding) on any machine with the ML dependencies, and a test proves it.
"""
