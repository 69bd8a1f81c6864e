"""Fields every method's config file shares: the run, the data, the trunk, the optimiser, the
evaluation and checkpointing, with the embedded digits data set as the default."""

from __future__ import annotations

import ml_collections

__all__ = ["base_config", "apply_smoke"]


def base_config() -> ml_collections.ConfigDict:
    """The shared fields with their defaults (digits, small CNN, SGD 0.05, 25 cycles)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_devices = 0  # 0 = every visible device
    config.num_cycles = 25
    config.epochs_per_cycle = 1
    config.batch_size = 64
    config.eval_batch_size = 512
    config.eval_every_cycles = 0
    config.augment = "none"  # none | flip | crop_flip; the clustering pass never augments

    config.data = ml_collections.ConfigDict(
        dict(
            source="digits",
            path="",
            name="",
            cache_dir="",
            max_train_examples=0,
            max_test_examples=0,
            test_fraction=0.25,
            seed=0,
        )
    )
    config.input = ml_collections.ConfigDict(dict(image_size=0, crop_scale=(0.08, 1.0)))
    config.model = ml_collections.ConfigDict(dict(name="small_cnn", sobel=False, kwargs={}))
    config.optim = ml_collections.ConfigDict(
        dict(learning_rate=0.05, momentum=0.9, head_momentum=0.0, weight_decay=1e-5)
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            probe_layer="features",
            knn_layer="features",
            knn_k=20,
            probe_epochs=30,
            probe_batch_size=128,
            probe_learning_rate=1e-3,
        )
    )
    config.checkpoint = ml_collections.ConfigDict(dict(keep=2))
    return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
    """Shrinks ``config`` in place to a run of seconds: 2 cycles on a tiny subset."""
    config.num_cycles = 2
    config.data.max_train_examples = 256
    config.data.max_test_examples = 128
    config.batch_size = 32
    config.eval_batch_size = 64
    config.eval.probe_epochs = 2
    config.eval.knn_k = 5
