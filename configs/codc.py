"""Collaborative Online Deep Clustering (CODC) on scikit-learn's digits by default.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/codc.py

What it does: ODC (configs/odc.py, same fields and defaults) with several trunks trained
together: their L2-normalised features are concatenated to update the shared samples and
centroids memories, and the labels are the targets of every trunk's own head. Each trunk has its
own head and optimizer slots, all in one state. Default: two small CNNs of different widths
(128 and 64 features). The final report probes the concatenation of the trunks' probe layers
(``eval.probe_layer``) and each trunk alone (``eval.extra_probe_layers``).

Start a trunk from an earlier dcjax run (e.g. DeepCluster, as the paper's DC backbone) with
``--config.method.init_workdirs='("runs/deepcluster-digits", "")'``: entry i is the workdir whose
latest checkpoint gives trunk i its parameters and batch-norm statistics ('' = random init); that
checkpoint's trunk must have trunk i's architecture.

Variants, comma-separated after a colon: ``fmnist`` (two LeNet-5s), ``cifar10`` (two mini-AlexNets),
``vectors`` (two MLPs on vector data), ``imagenet`` (two ResNet-50s with ODC's neck, ODC's ImageNet
recipe; the paper trains three ResNet-50s started from DC, rotation and mixup models for 100,000
iterations at constant lr 0.01: set ``method.init_workdirs`` to runs of those), ``smoke`` (seconds;
the tests), otherwise as in configs/odc.py. The paper's figures are VOC07 SVM ones (79.82 % with its
strongest CODC model); no ImageNet linear figure is published for CODC.

  python -m dcjax.main --config configs/codc.py:imagenet --config.data.path=/data/imagenet \
      --config.method.init_workdirs='("runs/dc-imagenet-r50", "")' --workdir=runs/codc-imagenet
  (a pod: the same command on every host, experiments/launch/; 8 H100s or a TPU v4-32 hold it,
  bench/results/pod_estimate-intel-xeon-2cpu.md)
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
    del variants  # applied by configs/odc.py
    return config
