"""The named training recipes: TrainConfig fields (workers.ml.training) as plain JSON-able dicts.

    train(TrainConfig.from_overrides(RECIPES["renderer"], {"epochs": 1}))
    python -m workers.ml.benchmark renderer --train      # trains a recipe (and its fine-tuning stages)

A recipe names its data by a data-set spec (workers.ml.datasets.factory). The admin's retraining starts from
TrainConfig's own defaults, not from a recipe.
"""

from __future__ import annotations

# The default recipes (TrainConfig fields). Fashion-MNIST: 48 px input (the photos are 28 px), 256-bit codes,
# InfoNCE + batch-hard triplet on fc7 and on the relaxed codes, P=64 x K=2 (a clean photo + a strong shopper
# view); 3 epochs + 1 fine-tuning epoch = 2,400 steps, 24 min on 2 cores (measured: 0.58 s a step). An earlier
# recipe trained 128 bits first and fine-tuned a fresh 256-bit layer in a third stage (3,000 steps, ~30 min):
# "mild" cascade R@1 0.952 against 0.937 now, but over the 30-minute budget.
# Renderer: 64 px with a stride-8 landmark map, landmarks weighted up.
# A recipe may add fine-tuning stages (FINE_TUNE_STAGES): each starts from the previous stage's model.pt.
RECIPES: dict[str, dict] = {
    "fashion-mnist": {
        "out_dir": "var/runs/fashion_mnist",
        "dataset": {"name": "fashion-mnist"},
        "model": {"input_size": 48, "code_bits": 256},
        "epochs": 3,
        "steps_per_epoch": 600,
        "instances_per_batch": 64,
        "views_per_instance": 2,
        "lr": 0.002,
        "augment": "strong",
        "loss_weights": {
            "triplet": 0.5,
            "hash_triplet": 0.5,
            "infonce": 1,
            "hash_infonce": 1,
            "category": 0.5,
            "hash_quantization": 0.2,
            "hash_balance": 0.1,
        },
    },
    "renderer": {
        "out_dir": "var/runs/renderer",
        "dataset": {"name": "renderer", "products": 2000, "views": 2},
        "model": {"input_size": 64, "code_bits": 64, "local_stride": 8},
        "epochs": 4,
        "steps_per_epoch": 150,
        "instances_per_batch": 32,
        "views_per_instance": 2,
        "lr": 0.002,
        "augment": "mild",
        "loss_weights": {
            "landmarks": 5,
            "visibility": 0.5,
            "triplet": 0.5,
            "hash_triplet": 0.5,
            "infonce": 1,
            "hash_infonce": 1,
            "category": 0.5,
            "attributes": 0.5,
            "hash_quantization": 0.2,
            "hash_balance": 0.1,
        },
    },
}
# DeepFashion In-shop, for users who have it (never run here: the data cannot be downloaded). Real photos:
# 96 px, several real views per item (K=3: one clean, two shopper views), landmarks and attributes on.
RECIPES["deepfashion-inshop"] = {
    "out_dir": "var/runs/deepfashion_inshop",
    "dataset": {"name": "deepfashion-inshop", "root": "", "crop_to_bbox": False},
    "model": {"input_size": 96, "code_bits": 128, "local_stride": 8},
    "epochs": 12,
    "instances_per_batch": 32,
    "views_per_instance": 3,
    "lr": 0.002,
    "augment": "mild",
    "loss_weights": {**RECIPES["renderer"]["loss_weights"], "landmarks": 2},
}
# The benchmarks' recipes train the whole network from ImageNet, at their small sizes, with fresh heads: not the shop
# retrain's start from version 0 that TrainConfig's defaults are (workers.ml.warm_start).
FROM_IMAGENET: dict = {
    "start_from_version0": False,
    "trainable_blocks": -1,
    "select_on_validation": False,
    "model": {"global_head": False, "fc6_global_dim": 512, "fc7_dim": 512, "dropout": 0.1},
}
for _name, _recipe in RECIPES.items():
    RECIPES[_name] = {**FROM_IMAGENET, **_recipe, "model": {**FROM_IMAGENET["model"], **_recipe["model"]}}
# Fashion-MNIST stage 2: one more pass at a quarter of the learning rate with a 5x stronger pull of the hash
# activations toward 0/1 (measured on the 256-bit recipe: validation fc7 R@1 0.861 -> 0.873, Hamming
# 0.815 -> 0.834).
FINE_TUNE_STAGES: dict[str, list[dict]] = {
    "fashion-mnist": [
        {
            **RECIPES["fashion-mnist"],
            "out_dir": "var/runs/fashion_mnist_finetune",
            "epochs": 1,
            "seed": 1,  # fresh batches, not a replay of stage 1's first epoch
            "lr": 0.0005,
            "loss_weights": {**RECIPES["fashion-mnist"]["loss_weights"], "hash_quantization": 1.0},
        },
    ]
}
