"""DeepCluster (v1) on scikit-learn's digits by default; variants for Fashion-MNIST and CIFAR-10.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/deepcluster.py

Variants, comma-separated after a colon (``configs/deepcluster.py:fmnist,smoke``):
  fmnist   LeNet-5 on Fashion-MNIST (IDX files of Debian's dataset-fashion-mnist), the deep-dive
           paper's settings: K=5, no PCA, lr 0.1, momentum 0.1, wd 1e-3, batch 128, 50 cycles,
           probe on conv2.
  cifar10  The deep-dive paper's mini-AlexNet with Sobel on a CIFAR-10 image folder
           (``--config.data.path=<dir with train/ and test/>``): K=1000, PCA 256, lr 0.1,
           momentum 0.9, wd 1e-3, batch 64, 100 cycles, probe on relu5.
  smoke    a few seconds: tiny data subset and 2 cycles (used by the tests).

Expected result (digits default, 2-core CPU): see the README's table of measured figures.
"""

import ml_collections

from dcjax.config_base import apply_cifar10, apply_smoke, base_config, parse_variants


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(arg, {"fmnist", "cifar10", "smoke"}, "configs/deepcluster.py")

    config = base_config()
    config.method = ml_collections.ConfigDict(
        dict(
            name="deepcluster",
            num_clusters=50,
            pca_dim=32,  # 0 = no PCA-whitening
            kmeans_iters=20,
            halt_clustering_after=0,  # 0 = cluster every cycle
            cluster_layer="features",
            samples_per_epoch=0,  # 0 = N, as the official sampler
        )
    )

    if "fmnist" in variants:
        config.data.source = "idx"
        config.model.name = "lenet5"
        config.method.update(num_clusters=5, pca_dim=0)
        config.optim.update(learning_rate=0.1, momentum=0.1, weight_decay=1e-3)
        config.batch_size = 128
        config.num_cycles = 50
        config.augment = "flip"
        config.eval.update(probe_layer="conv2", probe_epochs=20, probe_batch_size=256)
    if "cifar10" in variants:
        apply_cifar10(config)
        config.method.update(num_clusters=1000, pca_dim=256)
    if "smoke" in variants:
        apply_smoke(config)
        config.method.num_clusters = min(config.method.num_clusters, 10)
        config.method.pca_dim = min(config.method.pca_dim, 8)
    return config
