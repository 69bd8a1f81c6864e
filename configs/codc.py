"""Collaborative Online Deep Clustering (CODC) on scikit-learn's digits by default.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/codc.py

What it does: ODC (configs/odc.py, same fields and defaults) with several trunks trained
together: their L2-normalised features are concatenated to update the shared samples and
centroids memories, and the labels are the targets of every trunk's own head. Each trunk has its
own head and optimizer slots, all in one state. Default: two randomly initialised small CNNs of
different widths (128 and 64 features). The final report probes the concatenation of the trunks'
probe layers (``eval.probe_layer``) and each trunk alone (``eval.extra_probe_layers``).

CODC as the report defines it (Zhan et al. 2020, the Facebook AI Self-Supervision Challenge 2019
report, "Collaborative Online Deep Clustering" and "Pre-training Details") starts the trunks
from models pre-trained by different methods (DeepCluster, rotation prediction, mixup
classification), each under a new fc-bn-relu-fc neck. Here ``method.init_workdirs`` holds
one entry per trunk: entry i is an earlier dcjax run of any method (DeepCluster, SeLa,
DeepCluster-v2, ODC) whose latest checkpoint gives trunk i its parameters and batch-norm
statistics ('' = random init). The run's trunk must be trunk i's network; a run without a neck
gives a trunk with one (``model.neck``) its backbone, the neck staying randomly initialised
(``dcjax/methods/odc.py:start_trunk``); anything else is a ConfigError naming the entry and the
layers that differ. dcjax has no rotation or mixup method: the recipes take DeepCluster and a
second clustering method.

Recipe, digits (each run about a minute on a CPU): DeepCluster gives trunk 0 (the 128-feature
CNN), SeLa with a 64-feature CNN trunk 1, then CODC from both (tests/methods/test_codc_recipe.py
runs these commands at smoke size):
  python -m dcjax.main --config configs/deepcluster.py --workdir=runs/codc-digits/deepcluster
  python -m dcjax.main --config configs/sela.py --config.model.kwargs='{"feature_dim": 64}' \
      --workdir=runs/codc-digits/sela
  python -m dcjax.main --config configs/codc.py --workdir=runs/codc-digits/codc \
      --config.method.init_workdirs='("runs/codc-digits/deepcluster", "runs/codc-digits/sela")'

Recipe, CIFAR-10 (an image folder with train/ and test/; every method's ``:cifar10`` trunk is
the deep-dive paper's mini-AlexNet with Sobel, so the runs fit CODC's two trunks as they are):
  python -m dcjax.main --config configs/deepcluster.py:cifar10 --config.data.path=/data/cifar10 \
      --workdir=runs/codc-cifar10/deepcluster
  python -m dcjax.main --config configs/sela.py:cifar10 --config.data.path=/data/cifar10 \
      --workdir=runs/codc-cifar10/sela
  python -m dcjax.main --config configs/codc.py:cifar10 --config.data.path=/data/cifar10 \
      --workdir=runs/codc-cifar10/codc \
      --config.method.init_workdirs='("runs/codc-cifar10/deepcluster", "runs/codc-cifar10/sela")'

Recipe, ImageNet (``:imagenet``'s trunks are ResNet-50s with ODC's neck). configs/deepcluster.py:
imagenet is the paper's AlexNet with Sobel: a ResNet-50 DeepCluster run ("dc-imagenet-r50")
takes the overrides below (model, no Sobel, probes and kNN on the average pool);
configs/deepcluster_v2.py:imagenet is a ResNet-50 already (its projection heads are left out):
  python -m dcjax.main --config configs/deepcluster.py:imagenet --config.data.path=/data/imagenet \
      --config.model.name=resnet50 --config.model.sobel=False --config.eval.probe_layer=pooled \
      --config.eval.extra_probe_layers='()' --config.eval.knn_layer=pooled \
      --workdir=runs/dc-imagenet-r50
  python -m dcjax.main --config configs/deepcluster_v2.py:imagenet \
      --config.data.path=/data/imagenet --workdir=runs/dcv2-imagenet
  python -m dcjax.main --config configs/codc.py:imagenet --config.data.path=/data/imagenet \
      --config.method.init_workdirs='("runs/dc-imagenet-r50", "runs/dcv2-imagenet")' \
      --workdir=runs/codc-imagenet
  (a pod: the same commands on every host, experiments/launch/; 8 H100s or a TPU v4-32 hold
  CODC, bench/results/pod_estimate-intel-xeon-2cpu.md)

Variants, comma-separated after a colon: ``fmnist`` (two LeNet-5s), ``cifar10`` (two
mini-AlexNets), ``vectors`` (two MLPs on vector data), ``imagenet`` (below), ``smoke`` (seconds;
the tests), otherwise as in configs/odc.py.

``imagenet``: two ResNet-50s, each with ODC's neck (fc 2048 -> 512 -> BN -> ReLU -> fc 256),
ODC's augmentation, batch 512, momentum 0.9, wd 1e-5 (configs/odc.py:imagenet), and the report's
CODC schedule ("Pre-training Details": "trained for 100K iterations with a constant learning
rate 0.01"): lr 0.01 constant for 40 epochs of 1,281,167 // 512 = 2,502 steps, 100,080
iterations (the report gives no batch size; 512 is OpenSelfSup's ODC batch). K = 1,000: the
report trains one CODC model with 1K clusters and one with 4K
(``--config.method.num_clusters=4000``) and averages their parameters, which dcjax does not do.
The report's final model has three trunks (DC, ROT, CLS; its Table 2 also two, DC and ROT): a
third is one more entry in ``method.backbones``, ``backbone_kwargs`` and ``init_workdirs``. Its
figures are VOC07 SVM ones on the concatenated layer-5 features (79.82 % with the three trunks,
the third a mixup classifier trained on clustering labels, CLS); no ImageNet linear figure is
published for CODC.
"""

import ml_collections

from dcjax.config_base import load_config, parse_variants


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(
        arg, {"fmnist", "cifar10", "imagenet", "tfds", "vectors", "smoke"}, "configs/codc.py"
    )
    config = load_config("odc", arg)
    name = config.model.name
    config.method.backbones = (name, name)
    if name == "small_cnn":
        kwargs = ({"feature_dim": 128}, {"feature_dim": 64})
    else:  # the same trunk twice (the smoke forms' thin ones included)
        kwargs = (dict(config.model.kwargs), dict(config.model.kwargs))
    config.method.backbone_kwargs = kwargs
    config.method.init_workdirs = ("", "")
    layer = config.eval.probe_layer
    config.eval.probe_layer = f"b0/{layer}+b1/{layer}"
    config.eval.knn_layer = "b0/features"
    config.eval.extra_probe_layers = (f"b0/{layer}", f"b1/{layer}")
    if "imagenet" in variants:  # the report's CODC schedule (the docstring); the rest is ODC's
        config.optim.update(learning_rate=0.01, schedule="constant")
        if "smoke" not in variants:
            config.method.num_clusters = 1000
            config.num_cycles = 40  # 40 x (1,281,167 // 512) = 100,080 iterations
    return config
