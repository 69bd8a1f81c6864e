"""Online Deep Clustering (ODC) on scikit-learn's digits by default.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/odc.py

What it does: a small CNN and a ReLU -> Linear(K=20) head trained for 25 epochs on labels held
in a samples memory. One feature pass and k-means initialise the memory; after that there is no
feature pass: every step writes the batch's features into the memory (momentum 0.5), re-labels
the batch with its nearest centroid, recomputes the centroids every 10 steps and dissolves and
refills clusters under 20 members (see ``dcjax/methods/odc.py``). The loss is cross-entropy
re-weighted by 1 / sqrt(cluster size). Random resized crops (area 0.5-1, no mirroring: a mirrored
digit is another symbol).

Variants, comma-separated after a colon (``configs/odc.py:fmnist``):
  fmnist   LeNet-5 on Fashion-MNIST (IDX files of Debian's dataset-fashion-mnist), the
           optimiser and budget of configs/deepcluster.py:fmnist (lr 0.1, momentum 0.1, wd 1e-3,
           batch 128, the images padded black to 32x32), K=100, ODC's augmentation; probes on
           conv2 (ours and the authors' SGD probe, eval.protocol="deepdive", as
           deepcluster.py:fmnist).
  cifar10  the deep-dive paper's mini-AlexNet with Sobel on a CIFAR-10 image folder
           (``--config.data.path=...``), trunk and optimiser as configs/deepcluster.py:cifar10,
           K=1000, ODC's augmentation (crop, flip, rotation +-2 degrees, colour jitter, grey).
  imagenet OpenSelfSup's ODC (configs/selfsup/odc/r50_v1.py): ResNet-50 with its neck fc
           2048 -> 512 -> BN (no affine) -> ReLU -> Dropout 0.5 -> fc 256 -> ReLU
           (``model.neck``, ``model.neck_style="openselfsup"``; its output is what the memory
           holds and the head reads), K=10,000, memory momentum 0.5, re-weighting power 0.5,
           clusters under 20 dissolved, SGD lr 0.06, momentum 0.9 (none on the head), wd 1e-5,
           x0.4 at epoch 400 of 440, batch 512, ODC's augmentation. Image folder with train/
           and val/; add ``tfds`` for TFDS's imagenet2012. OpenSelfSup samples with
           replacement, this run one shuffled pass per epoch.
             one host:  python -m dcjax.main --config configs/odc.py:imagenet \
                          --config.data.path=/data/imagenet --workdir=runs/odc-imagenet
             pod:       the same command on every host (experiments/launch/).
           Expected (OpenSelfSup model zoo, ImageNet linear): avgpool 53.42 % top-1 (stages
           feat1..feat5: 14.76 / 31.82 / 42.44 / 55.76 / 57.70); the probe here reads the
           average pool.
  vectors  vector data and an MLP, no augmentation (config_base.apply_vectors; digits as
           64-d vectors by default, ``--config.data.path`` for yours), K=20.
  smoke    a few seconds: tiny data subset and 2 epochs (the tests); with imagenet one epoch
           of a ResNet-50 at width 4 with one block per stage on a tiny 224-px folder.

Fields of ``config.method``: ``num_clusters`` K; ``memory_momentum``; ``reweight_pow``;
``centroids_update_interval``; ``small_cluster_interval``; ``min_cluster_size``;
``max_small_clusters`` (clusters dissolved per check, the rest wait for the next check; 0:
all); ``split_iters`` (2-means iterations of a split); ``memory_features`` (``relu`` or ``raw``),
``relabel_metric`` (``dot`` or ``euclidean``) and ``small_cluster_split`` (``whole`` or
``subset``): OpenSelfSup's geometry by default, the other values dcjax's former one
(``dcjax/methods/odc.py``); ``kmeans`` (the initial k-means, one field per field of
``KMeansConfig``). K and ``min_cluster_size`` must satisfy N >= 2 K min_cluster_size.
"""

import ml_collections

from dcjax.clustering import settings
from dcjax.clustering.kmeans import KMeansConfig
from dcjax.config_base import (
    apply_cifar10,
    apply_imagenet,
    apply_smoke,
    apply_vectors,
    base_config,
    parse_variants,
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(
        arg, {"fmnist", "cifar10", "imagenet", "tfds", "vectors", "smoke"}, "configs/odc.py"
    )
    config = base_config()
    # OpenSelfSup's defaults, except K (set per data set).
    config.method = ml_collections.ConfigDict(
        dict(
            name="odc",
            num_clusters=20,
            memory_momentum=0.5,
            reweight_pow=0.5,
            centroids_update_interval=10,
            small_cluster_interval=1,
            min_cluster_size=20,
            max_small_clusters=0,  # 0: every small cluster at each check
            split_iters=20,
            # OpenSelfSup's geometry: the memory holds ReLU(features) ("raw": them) and the
            # batch is relabelled, and dissolved clusters' members moved, by the largest dot
            # product with the member means ("euclidean": the smallest distance); a freed id
            # takes one side of a 2-means split of every member of the largest cluster
            # ("subset": of a sample of them).
            memory_features="relu",
            relabel_metric="dot",
            small_cluster_split="whole",
            # CODC (configs/codc.py): trunks trained together, their constructor arguments and
            # the runs they start from; empty: ODC on config.model.
            backbones=(),
            backbone_kwargs=(),
            init_workdirs=(),
            kmeans=settings.fields(KMeansConfig, num_iters=20, max_points_per_centroid=0),
            cluster_layer="features",
            samples_per_epoch=0,  # 0 = N: one shuffled pass per epoch
        )
    )
    config.augment = "crop"
    config.input.crop_scale = (0.5, 1.0)
    config.optim.head_momentum = 0.0  # OpenSelfSup's ODC head has no momentum
    if "fmnist" in variants:
        config.data.source = "idx"
        config.model.name = "lenet5"
        config.input.pad = 2  # LeNet-5's 32x32 input: a black frame, as deepcluster.py:fmnist
        config.method.num_clusters = 100
        config.optim.update(learning_rate=0.1, momentum=0.1, weight_decay=1e-3)
        config.batch_size = 128
        config.num_cycles = 50
        config.augment = "odc"
        config.input.crop_scale = (0.5, 1.0)
        config.eval.update(
            probe_layer="conv2", probe_epochs=20, probe_batch_size=256, protocol="deepdive"
        )
    if "cifar10" in variants:
        apply_cifar10(config)
        config.method.num_clusters = 1000
        config.augment = "odc"
    if "imagenet" in variants:
        apply_imagenet(config, variants)
        config.model.update(name="resnet50", sobel=False, kwargs={}, neck=(512, 256))
        config.method.num_clusters = 10_000
        config.augment = "odc"
        config.input.crop_scale = (0.08, 1.0)
        config.batch_size = 512
        config.num_cycles = 440
        config.optim.update(
            learning_rate=0.06,
            momentum=0.9,
            weight_decay=1e-5,
            schedule="step",
            step_epochs=(400,),
            step_factor=0.4,
        )
        config.eval.update(probe_layer="pooled", knn_layer="pooled")
    if "vectors" in variants:
        apply_vectors(config)
    if "smoke" in variants:
        apply_smoke(config, variants)
        if "imagenet" in variants:
            config.model.kwargs = {"width": 4, "stage_sizes": (1, 1, 1, 1)}
            config.model.neck = (16, 8)
            config.method.update(num_clusters=2, min_cluster_size=2, max_small_clusters=1)
        else:
            config.method.update(num_clusters=4, min_cluster_size=8, max_small_clusters=2)
    return config
