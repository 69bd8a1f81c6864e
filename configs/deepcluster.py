"""DeepCluster (v1) on scikit-learn's digits by default; variants for Fashion-MNIST and CIFAR-10.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/deepcluster.py

Variants, comma-separated after a colon (``configs/deepcluster.py:fmnist,smoke``):
  fmnist   LeNet-5 on Fashion-MNIST (IDX files of Debian's dataset-fashion-mnist), the deep-dive
           paper's text: K=5, no PCA, lr 0.1, momentum 0.1, wd 1e-3, batch 128, 50 cycles,
           flip, the 28x28 images padded black to 32x32 (input.pad=2), probes on conv2 (ours,
           and the authors' SGD probe: eval.protocol="deepdive").
  deepdive_code  with fmnist: what the deep-dive authors' code (AhmadM-DL/
           DeepClusterImplementation, master 0894889) does instead, each a field of its own:
           clustering / probe view Resize 44 + CenterCrop 32 (input.eval_resize=44,
           input.image_size=32, input.pad=0); training torchvision's RandomResizedCrop(32) of
           the 28x28 image (integer sides, up to 10 re-draws, centre fallback, PIL bilinear
           resize of the crop; augment="torchvision_crop"), no flip; normalisation .2860 /
           .3205 (input.mean / std); their initialisation (model.init="deepcluster");
           scikit-learn's KMeans(K, max_iter=20, n_init=1) in float64 (method.kmeans: greedy
           k-means++ with 2 + int(ln K) candidates per centre, kmeanspp_trials=0; stop at
           unchanged labels or a centre shift within tol=1e-4 of the mean feature variance,
           stop="sklearn"; empty clusters moved to the farthest points,
           empty_clusters="relocate"; dtype="float64"); the head's SGD with the trunk's
           momentum, read when the optimisers are built (optim.head_momentum=None); the
           un-truncated uniform sampler (method.truncate_epoch=False) and the DataLoader's
           partial last batch (drop_last=False: 468 batches of 128 and one of 101, cut to a
           multiple of the device count). The float64 k-means needs a CPU or GPU backend.
           Differences left: JAX's random streams instead of NumPy's / torch's, float pixels
           where PIL rounds resized views to uint8 (< 1/255), the L2 normalisation before
           k-means in float32 (theirs float64), BN's running variance biased (n/(n-1), n >=
           12,800).
  cifar10  The deep-dive paper's mini-AlexNet with Sobel on a CIFAR-10 image folder
           (``--config.data.path=<dir with train/ and test/>``): K=1000, PCA 256, lr 0.1,
           momentum 0.9, wd 1e-3, batch 64, 100 cycles, probe on relu5.
  imagenet the paper's ImageNet setting (Caron et al. 2018 and the official main.py): AlexNet
           with batch norm and Sobel, K=10,000, PCA-whitening to 256, k-means 20 iterations,
           SGD lr 0.05, momentum 0.9 (none on the re-initialised head), wd 1e-5, batch 256,
           RandomResizedCrop 224 + flip, 200 epochs (the author needed about 500 for Table
           1); probes on conv1..conv5 average-pooled to about 9,000 values (eval_linear.py's
           protocol, ``probe1``..``probe5``). Image folder with train/ and val/
           (``--config.data.path``); add ``tfds`` for TFDS's imagenet2012. Data and evaluation
           as ``dcjax.config_base.apply_imagenet``.
             one host:  python -m dcjax.main --config configs/deepcluster.py:imagenet \
                          --config.data.path=/data/imagenet --workdir=runs/dc-imagenet
             pod:       the same command on every host (experiments/launch/tpu_pod.sh,
                          slurm.sbatch), the workdir on storage every host sees.
           Expected (paper Table 1, ImageNet linear, conv1..conv5): 12.9 / 29.2 / 38.2 / 39.8 /
           36.1 % top-1 under DeepCluster's own protocol (eval_linear.py: a linear layer per
           pooled conv layer, 90 epochs on all of ImageNet, ten test crops), an evaluation job
           of its own once training is done:
             python -m dcjax.evaluate --workdir=runs/dc-imagenet \
               --config.eval.protocol=deepcluster --random_init=false
           This run's in-training probes fit on 100,000 images: read them as a lower bound.
           Per-device memory and step time: bench/results/pod_estimate.md.
  vectors  vector data and an MLP, no augmentation (config_base.apply_vectors: scikit-learn's
           digits as 64-d vectors by default; ``--config.data.path=<.npy/.npz/.csv file,
           sklearn:<name> or idx:<dir>>``), K=50, PCA 32.
  smoke    a few seconds: tiny data subset and 2 cycles (used by the tests); with imagenet one
           cycle of the same network at 224 px on a tiny folder, fc layers 256 wide.

The two Fashion-MNIST protocols, one command each (both report our probe and the authors'):
  python -m dcjax.main --config configs/deepcluster.py:fmnist --workdir=runs/dc_fmnist
  python -m dcjax.main --config configs/deepcluster.py:fmnist,deepdive_code \
      --workdir=runs/dc_fmnist_code

Expected result (digits default, 2-core CPU): see the README's table of measured figures; the
Fashion-MNIST figures are in the README's "Reproduction: deep dive on Fashion-MNIST".
"""

import ml_collections
from ml_collections import config_dict

from dcjax.clustering import settings
from dcjax.clustering.kmeans import SKLEARN_SETTINGS, KMeansConfig
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
        arg,
        {"fmnist", "deepdive_code", "cifar10", "imagenet", "tfds", "vectors", "smoke"},
        "configs/deepcluster.py",
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
            # "cluster_sorted": the official main.py's draws, read as positions in the images
            # sorted by cluster (its sampler / dataset index mismatch); "dataset": the paper.
            sampler_order="dataset",
        )
    )

    if "fmnist" in variants:
        config.data.source = "idx"
        config.model.name = "lenet5"
        config.input.pad = 2  # LeNet-5's 32x32 input: a black frame, added before normalising
        config.method.update(num_clusters=5, pca_dim=0)
        config.optim.update(learning_rate=0.1, momentum=0.1, weight_decay=1e-3)
        config.batch_size = 128
        config.num_cycles = 50
        config.augment = "flip"
        config.eval.update(
            probe_layer="conv2", probe_epochs=20, probe_batch_size=256, protocol="deepdive"
        )
    if "deepdive_code" in variants:
        config.input.update(image_size=32, eval_resize=44, pad=0, mean=(0.2860,), std=(0.3205,))
        config.augment = "torchvision_crop"
        config.model.init = "deepcluster"
        # scikit-learn's KMeans(K, max_iter=20, n_init=1) on their float64 features.
        config.method.kmeans.update(SKLEARN_SETTINGS)
        config.method.truncate_epoch = False
        config.drop_last = False
        # A param group added without its own momentum inherits the optimiser's.
        config.optim.head_momentum = config_dict.placeholder(float)
    if "cifar10" in variants:
        apply_cifar10(config)
        config.method.update(num_clusters=1000, pca_dim=256)
    if "imagenet" in variants:
        apply_imagenet(config, variants)
        config.model.update(name="alexnet", sobel=True)
        config.method.update(num_clusters=10_000, pca_dim=256)
        config.num_cycles = 200
        config.eval.update(
            probe_layer="probe5",
            extra_probe_layers=("probe1", "probe2", "probe3", "probe4"),
            knn_layer="features",
        )
    if "vectors" in variants:
        apply_vectors(config)
    if "smoke" in variants:
        apply_smoke(config, variants)
        if "imagenet" in variants:
            config.model.kwargs = {"hidden_dim": 256}
        config.method.num_clusters = min(
            config.method.num_clusters, 4 if "imagenet" in variants else 10
        )
        config.method.pca_dim = min(config.method.pca_dim, 8)
    return config
