"""DeepCluster-v2 with self-distillation (Adnan et al. 2021) on digits by default.

Launch (the embedded default; no download):
  python -m dcjax.main --config configs/deepcluster_v2_kd.py

Everything of ``configs/deepcluster_v2.py`` (same variants: ``cifar10``, ``larc``, ``cpu``,
``imagenet`` with ``tfds``, ``vectors`` (an MLP whose hidden layers 1-3 feed the students),
``smoke``), with a ResNet (18; 50 with ``imagenet``) whose stages 1-3 feed three bottleneck
branches, each with its own projection head and prototypes (the students; the deepest classifier is
the teacher), and the loss L_c + (1 - alpha) sum L_i + alpha L_KL + lambda L_hints with alpha = 0.9,
lambda = 1e-5 (seed Appendix A.1). The probe reads the backbone's pooled features: the branches are
dropped, so DC-v2 and DC-v2 + KD are compared on the same network. On digits the trunk is a
ResNet-18 at width 16 with the CIFAR stem (8x8 inputs). The seed trains on CIFAR only: ``imagenet``
is DeepCluster-v2's ImageNet recipe with the branches added, on one 224-px view per image and step
(SwAV's augmentation; the students train on one view size, so no multi-crop), and has no
published figure.

The seed's eq. 2-5 fix the terms and their weights but not their form; ``method.kd_style`` picks it
(dcjax/methods/deepcluster_v2.py's docstring has the formulas):
  byot   (the default) BYOT's official code (luanyunteng/pytorch-be-your-own-teacher, 8045079):
         each branch one 1x1 -> k x k stride-k -> 1x1 block (k = 8, 4, 2 on the CIFAR stem), the KD
         term T^2 H(softmax(z_teacher / T), softmax(z_student / T)) averaged over the batch with
         T = ``method.kd_temperature`` = 3 on the logits z = scores / tau, the hint on pooled
         features summed over the batch. The default: where the paper is silent dcjax follows the
         official code, and no run has yet measured a reason to differ (experiments/kd_vs_dcv2.py
         runs both styles).
  dcjax  dcjax's earlier design: branches of residual stride-2 bottlenecks, the KL at the
         classifiers' tau without T^2, the hint on the spatial maps averaged over the batch. Runs
         saved before the field existed were this; they resume with
         ``--config.method.kd_style=dcjax``.
``config.model.kwargs.branch_style`` is linked to ``method.kd_style`` (setting one sets both). On
``vectors`` the MLP's students keep their one Linear -> norm -> ReLU layer under both styles
(BYOT's block has no vector form: its k x k stride-k conv spans a spatial map), so there the style
changes the two loss terms only.

  python -m dcjax.main --config configs/deepcluster_v2_kd.py:imagenet \
      --config.data.path=/data/imagenet --workdir=runs/dcv2kd-imagenet
  (a pod: the same command on every host, experiments/launch/; about 64 H100s at batch 4096,
  bench/results/pod_estimate-intel-xeon-2cpu.md)
"""

import ml_collections

from dcjax.config_base import load_config, parse_variants


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = parse_variants(
        arg,
        {"cifar10", "larc", "cpu", "imagenet", "tfds", "vectors", "smoke"},
        "configs/deepcluster_v2_kd.py",
        requires={"larc": "cifar10"},
    )
    config = load_config("deepcluster_v2", arg)
    config.method.self_distillation = True
    if config.model.name not in ("resnet18", "resnet50", "mlp", "residual_mlp"):  # digits
        config.model.update(name="resnet18", sobel=False, kwargs={"cifar_stem": True, "width": 16})
        if "smoke" in variants:  # one block per stage: compiles in seconds
            config.model.kwargs = {"cifar_stem": True, "width": 4, "stage_sizes": (1, 1, 1, 1)}
    config.model.kwargs = {**config.model.kwargs, "num_branches": 3}
    if config.model.name.startswith("resnet"):  # a reference: overriding either sets both
        config.model.kwargs.branch_style = config.method.get_ref("kd_style")
    if config.augment == "multicrop":  # the hint loss needs one view size: SwAV's 2 x 224
        config.augment = "swav"
        config.input.crop_scale = tuple(config.input.crops[0][2])
        config.input.crops = ()
    # The backbone's own features (the branches dropped): a ResNet's pool, an MLP's output.
    layer = "pooled" if config.model.name.startswith("resnet") else "features"
    config.eval.update(probe_layer=layer, knn_layer=layer)
    return config
