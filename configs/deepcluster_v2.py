"""DeepCluster-v2 on scikit-learn's digits by default; the seed paper's CIFAR-10 settings.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/deepcluster_v2.py

What it does: a small CNN with a projection head (hidden 256, 64-d L2-normalised embeddings)
and 30 prototypes is trained for 25 epochs, no augmentation. Each epoch starts with spherical
k-means (10 iterations) on the memory of every example's latest embedding; the prototypes are
set to the centroids and frozen for the first 5 epochs' worth of steps; the loss is the
cross-entropy of softmax(scores / 0.5) against the k-means labels. SGD with warm-up then
cosine. It prints the probe and kNN accuracies (random init -> trained) and the NMI.

Variants, comma-separated after a colon (``configs/deepcluster_v2.py:cifar10``):
  cifar10  Adnan et al. 2021, Appendix A.1, CIFAR-10 image folder
           (``--config.data.path=<dir with train/ and test/>``), no augmentation: ResNet-18
           (CIFAR stem), SGD lr 6e-2 -> 3e-4 cosine, 5 warm-up epochs from 1e-6, momentum 0.9,
           wd 1e-6, 150 epochs, batch 256, 60 prototypes, temperature 0.5, feature dim 128,
           hidden 1024, 5000 iterations of frozen prototypes; probe Adam 1e-3, 200 epochs, on
           the backbone's pooled features. The optimiser is plain SGD because the seed says
           "SGD"; SwAV's main_deepclusterv2.py, which the seed says it ran, always wraps that SGD
           in LARC (trust 0.001, no clipping), and the seed does not say it removed it: ``larc``
           runs that reading.
  larc     with cifar10: LARC around the SGD (``optim.optimizer="lars"``), as SwAV's script.
  cpu      with cifar10: the same recipe cut to a 2-core CPU (ResNet-18 at width 8, 5,000
           training and 2,000 test images, 10 epochs, batch 128, frozen prototypes for 2 epochs,
           probe 50 epochs).
  imagenet SwAV's DeepCluster-v2 ImageNet recipe (main_deepclusterv2.py and its scripts):
           ResNet-50, projection 2048 -> 128, 3 x 3,000 prototypes set from spherical k-means
           (10 iterations) and never trained, temperature 0.1, LARS (trust 0.001) lr 4.8 ->
           0.0048 cosine after 10 warm-up epochs from 0.3, wd 1e-6, batch 4096 (64 per GPU on
           64 GPUs), 800 epochs, multi-crop 2 x 224 (area 0.14-1) + 6 x 96 (area 0.05-0.14)
           with SwAV's flip, colour distortion and blur (``augment="multicrop"``,
           ``input.crops``): every crop is scored against its image's label, each large crop
           writes its own memory, and prototype set j clusters crop j mod 2's; the backbone
           runs per crop size, the projection head once over all crops (SwAV's forward). The
           2 x 224 recipe is below. Image folder with train/ and val/; add ``tfds`` for TFDS's
           imagenet2012.
             one host:  python -m dcjax.main --config configs/deepcluster_v2.py:imagenet \
                          --config.data.path=/data/imagenet --workdir=runs/dcv2-imagenet
             pod:       the same command on every host (experiments/launch/tpu_pod.sh).
           Expected (swav README, linear top-1 of eval_linear.py, which ``eval.protocol="swav"``
           runs: best epoch of 100, ``swav_best_top1``): 75.2 % at 800 epochs with 2 x 224 +
           6 x 96; 74.3 % at 400 with 2 x 160 + 4 x 96; 70.2 % at 400 with 2 x 224 (area
           0.08-1 in that script: ``--config.input.crops='((2, 224, (0.08, 1.0)),)'``).
  vectors  vector data and an MLP, no augmentation (config_base.apply_vectors; digits as
           64-d vectors by default, ``--config.data.path`` for yours), 30 prototypes.
  smoke    a few seconds: tiny data subset and 2 cycles (the tests); with cifar10 a ResNet-18
           at width 4 with one block per stage, with imagenet a ResNet-50 at width 4 with one
           block per stage on a tiny 224-px folder.
"""

import ml_collections

from dcjax.clustering import settings
from dcjax.clustering.kmeans import KMeansConfig
from dcjax.config_base import (
    apply_imagenet,
    apply_smoke,
    apply_vectors,
    base_config,
    parse_variants,
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(
        arg,
        {"cifar10", "larc", "cpu", "imagenet", "tfds", "vectors", "smoke"},
        "configs/deepcluster_v2.py",
        requires={"larc": "cifar10"},
    )

    config = base_config()
    config.method = ml_collections.ConfigDict(
        dict(
            name="deepcluster_v2",
            num_prototypes=(30,),
            temperature=0.5,
            feat_dim=64,
            hidden_dim=256,
            # SwAV's: random rows, spherical, an empty cluster keeps its centroid, no subset.
            kmeans=settings.fields(
                KMeansConfig,
                num_iters=10,
                spherical=True,
                max_points_per_centroid=0,
                empty_clusters="keep",
            ),
            # The first memory: "train" (SwAV's init_memory: the training views, batch-norm
            # batch statistics, not kept) or "eval" (running statistics, the clean view).
            label_pass="train",
            self_distillation=False,  # True: configs/deepcluster_v2_kd.py
            distill_alpha=0.9,  # self-distillation only
            hint_weight=1e-5,
            # "byot": BYOT's branch block, T^2-scaled KD at temperature kd_temperature on
            # scores / tau, hint on pooled features summed over the batch (the official code,
            # where the seed is silent); "dcjax": dcjax's own (configs/deepcluster_v2_kd.py).
            kd_style="byot",
            kd_temperature=3.0,  # BYOT's T; "byot" only
            cluster_layer="embeddings",
            samples_per_epoch=0,  # 0 = N: one shuffled pass per epoch
        )
    )
    config.optim.update(
        learning_rate=0.05,
        momentum=0.9,
        head_momentum=0.9,
        weight_decay=1e-6,
        schedule="warmup_cosine",
        warmup_epochs=2,
        warmup_learning_rate=1e-6,
        final_learning_rate=5e-4,
        # Prototypes frozen for the first steps (or epochs: one of the two is set).
        freeze_head_steps=0,
        freeze_head_epochs=5.0,
    )

    if "cifar10" in variants:
        config.data.source = "folder"
        config.model.update(name="resnet18", sobel=False, kwargs={"cifar_stem": True})
        config.method.update(num_prototypes=(60,), feat_dim=128, hidden_dim=1024)
        config.optim.update(
            learning_rate=6e-2,
            final_learning_rate=3e-4,
            warmup_epochs=5,
            freeze_head_steps=5000,  # the recipe's 5000 iterations
            freeze_head_epochs=0.0,
        )
        config.batch_size = 256
        config.num_cycles = 150
        config.input.image_size = 32
        config.eval.update(
            probe_layer="pooled", knn_layer="pooled", probe_epochs=200, probe_batch_size=256
        )
    if "larc" in variants:
        config.optim.optimizer = "lars"
    if "cpu" in variants:  # measured: about 3 min per run (KD) on 2 cores
        config.model.kwargs = {**config.model.kwargs, "width": 8}
        config.data.update(max_train_examples=5_000, max_test_examples=2_000)
        config.num_cycles = 10
        config.batch_size = 128
        config.optim.update(warmup_epochs=1, freeze_head_steps=0, freeze_head_epochs=2.0)
        config.eval.probe_epochs = 50
    if "imagenet" in variants:
        apply_imagenet(config, variants)
        config.model.update(name="resnet50", sobel=False, kwargs={})
        config.method.update(
            num_prototypes=(3000, 3000, 3000), temperature=0.1, feat_dim=128, hidden_dim=2048
        )
        # SwAV's multi-crop: 2 x 224 px of area 0.14-1 (each with its own memory) and 6 x 96
        # px of area 0.05-0.14, each with SwAV's colour distortion and blur.
        config.augment = "multicrop"
        config.input.crops = ((2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14)))
        config.batch_size = 4096
        config.num_cycles = 800
        config.optim.update(
            optimizer="lars",
            learning_rate=4.8,
            final_learning_rate=0.0048,
            warmup_epochs=10,
            warmup_learning_rate=0.3,
            weight_decay=1e-6,
            # SwAV's scripts freeze the prototypes for 300,000 iterations, longer than the
            # run: they are only ever set from the centroids.
            freeze_head_steps=300_000,
            freeze_head_epochs=0.0,
        )
        # SwAV's eval_linear.py on the pooled layer4, beside dcjax's own probe: the protocol
        # behind the figures quoted above.
        config.eval.update(probe_layer="pooled", knn_layer="pooled", protocol="swav")
    if "vectors" in variants:
        apply_vectors(config)
    if "smoke" in variants:
        apply_smoke(config, variants)
        config.method.update(feat_dim=16, hidden_dim=32)
        config.optim.update(freeze_head_steps=2, freeze_head_epochs=0.0)
        if "imagenet" in variants:
            config.method.num_prototypes = (4, 4)
            config.optim.warmup_epochs = 0
            if config.augment == "multicrop":  # the same structure, 2 small crops of 6
                config.input.crops = ((2, 224, (0.14, 1.0)), (2, 96, (0.05, 0.14)))
        else:
            config.method.num_prototypes = (10,)
            config.optim.warmup_epochs = 1
        if "cifar10" in variants or "imagenet" in variants:  # one block per stage, thin
            config.model.kwargs = {**config.model.kwargs, "width": 4, "stage_sizes": (1, 1, 1, 1)}
        if "cifar10" in variants:
            config.batch_size = 32
    return config
