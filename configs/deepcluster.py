"""DeepCluster (v1) on scikit-learn's digits by default; variants for Fashion-MNIST and CIFAR-10.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/deepcluster.py

Variants, comma-separated after a colon (``configs/deepcluster.py:fmnist,smoke``):
  fmnist   LeNet-5 on Fashion-MNIST (IDX files of Debian's dataset-fashion-mnist), the deep-dive
           paper's text: K=5, no PCA, lr 0.1, momentum 0.1, wd 1e-3, batch 128, 50 cycles,
           flip, probes on conv2 (ours, and the authors' SGD probe: eval.protocol="deepdive").
  deepdive_code  with fmnist: what the deep-dive authors' code does instead (REFERENCE.md), each
           a field of its own: clustering / probe view Resize 44 + CenterCrop 32
           (input.eval_resize=44, input.image_size=32); training RandomResizedCrop 32 of the
           28x28 image, no flip (augment="crop"); normalisation .2860 / .3205 (input.mean /
           std); their initialisation (model.init="deepcluster"); k-means++ with one start
           (method.kmeans.init); the head's SGD with the trunk's momentum
           (optim.head_momentum); the un-truncated uniform sampler (method.truncate_epoch).
  cifar10  The deep-dive paper's mini-AlexNet with Sobel on a CIFAR-10 image folder
           (``--config.data.path=<dir with train/ and test/>``): K=1000, PCA 256, lr 0.1,
           momentum 0.9, wd 1e-3, batch 64, 100 cycles, probe on relu5.
  smoke    a few seconds: tiny data subset and 2 cycles (used by the tests).

The two Fashion-MNIST protocols, one command each (both report our probe and the authors'):
  python -m dcjax.main --config configs/deepcluster.py:fmnist --workdir=runs/dc_fmnist
  python -m dcjax.main --config configs/deepcluster.py:fmnist,deepdive_code \
      --workdir=runs/dc_fmnist_code

Expected result (digits default, 2-core CPU): see the README's table of measured figures; the
Fashion-MNIST figures are in the README's "Reproduction: deep dive on Fashion-MNIST".
"""

import ml_collections

from dcjax.clustering import settings
from dcjax.clustering.kmeans import KMeansConfig
from dcjax.config_base import apply_cifar10, apply_smoke, base_config, parse_variants


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(
        arg, {"fmnist", "deepdive_code", "cifar10", "smoke"}, "configs/deepcluster.py"
    )

    config = base_config()
    config.method = ml_collections.ConfigDict(
        dict(
            name="deepcluster",
            num_clusters=50,
            pca_dim=32,  # 0 = no PCA-whitening
            # faiss as the official code runs it: random init, one run, no subsampling (its
            # max_points_per_centroid=10**7 never subsamples at DeepCluster's sizes), float32.
            kmeans=settings.fields(KMeansConfig, num_iters=20, max_points_per_centroid=0),
            halt_clustering_after=0,  # 0 = cluster every cycle
            cluster_layer="features",
            samples_per_epoch=0,  # 0 = N, as the official sampler
            truncate_epoch=True,  # False: keep all K' * (N // K' + 1) draws (deep-dive code)
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
        config.eval.update(
            probe_layer="conv2", probe_epochs=20, probe_batch_size=256, protocol="deepdive"
        )
    if "deepdive_code" in variants:
        if "fmnist" not in variants:
            raise ValueError("configs/deepcluster.py: deepdive_code applies to fmnist only")
        config.input.update(image_size=32, eval_resize=44, mean=(0.2860,), std=(0.3205,))
        config.augment = "crop"
        config.model.init = "deepcluster"
        config.method.kmeans.init = "kmeans++"  # scikit-learn's KMeans(n_init=1)
        config.method.truncate_epoch = False
        config.optim.head_momentum = config.optim.momentum
    if "cifar10" in variants:
        apply_cifar10(config)
        config.method.update(num_clusters=1000, pca_dim=256)
    if "smoke" in variants:
        apply_smoke(config)
        config.method.num_clusters = min(config.method.num_clusters, 10)
        config.method.pca_dim = min(config.method.pca_dim, 8)
    return config
