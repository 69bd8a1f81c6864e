"""Fields every method's config file shares: the run, the data, the trunk, the optimiser, the
evaluation and checkpointing, with the embedded digits data set as the default."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from dcjax.core.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "base_config",
    "apply_cifar10",
    "apply_imagenet",
    "apply_smoke",
    "apply_vectors",
    "load_config",
    "parse_variants",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def dotted_fields(tree: dict, prefix: str = "") -> dict:
    """A nested config dict (``config.to_dict()`` or config.json) as ``{"method.pca_dim": 32,
    ...}``; empty dicts stay leaves."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(dotted_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


# Variants that modify another one, which must be given with them.
_REQUIRES = {"tfds": "imagenet", "deepdive_code": "fmnist", "cpu": "cifar10"}


def parse_variants(
    arg: str | None, allowed: set[str], config_file: str, requires: dict[str, str] | None = None
) -> set[str]:
    """The comma-separated variants after ``configs/<file>.py:``.

    ``requires`` maps a variant to the one it modifies where a config file differs from the
    shared rule (``tfds`` needs ``imagenet``, ``cpu`` needs ``cifar10``, ...).

    Raises:
      ConfigError: naming ``config_file`` and the variants not in ``allowed``, or a variant
        given without the one it modifies.
    """
    required = {**_REQUIRES, **(requires or {})}
    variants = {v for v in (arg or "").split(",") if v}
    unknown = variants - allowed
    if unknown:
        raise ConfigError(f"unknown variants {sorted(unknown)} for {config_file}")
    for variant in sorted(variants):
        base = required.get(variant)
        if base and base not in variants:
            raise ConfigError(
                f"{config_file}: the {variant} variant modifies {base}: use :{base},{variant}"
            )
    return variants


def load_config(name: str, variants: str = "") -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config(variants)``, as ``--config configs/<name>.py:<v>``.

    Raises:
      FileNotFoundError: naming the path when ``configs/<name>.py`` does not exist.
    """
    path = os.path.join(CONFIG_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variants)


def base_config() -> ml_collections.ConfigDict:
    """The shared fields with their defaults (digits, small CNN, SGD 0.05, 25 cycles)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_devices = 0  # 0 = every visible device
    config.num_cycles = 25
    config.epochs_per_cycle = 1
    config.batch_size = 64
    # False: an epoch's last partial batch is one more step (PyTorch's DataLoader default).
    config.drop_last = True
    # Train steps per jitted call (a lax.scan on the device, one host sync); 0 = a whole epoch.
    config.steps_per_call = 0
    config.eval_batch_size = 512
    config.eval_every_cycles = 0
    config.figures = True  # PNGs in <workdir>/figures at the end (loss, NMI, clusters, t-SNE)
    # none | flip | crop | crop_flip | torchvision_crop | torchvision_crop_flip (torchvision's
    # exact RandomResizedCrop) | odc | sela | swav | multicrop (SwAV's views of the input.crops
    # groups; DeepCluster-v2 and SeLa); the clustering pass never augments.
    config.augment = "none"

    config.data = ml_collections.ConfigDict(
        dict(
            source="digits",
            path="",
            name="",
            test_split="test",  # tfds: the split scored as test ("validation": imagenet2012)
            label_column="",  # vectors from CSV: "first", "last" or a header name
            cache_dir="",
            max_train_examples=0,
            max_test_examples=0,
            test_fraction=0.25,
            seed=0,
            class_fractions=(),  # per-class share of the train split kept (imbalanced data)
        )
    )
    # eval_resize: the clustering / probe view is Resize(eval_resize) + CenterCrop(image_size)
    # (0 = resize to image_size); mean / std: normalisation constants (() = the train images');
    # pad: black pixels added on each side of every image first (LeNet-5: 28 -> 32).
    config.input = ml_collections.ConfigDict(
        dict(
            image_size=0,
            crop_scale=(0.08, 1.0),
            eval_resize=0,
            mean=(),
            std=(),
            pad=0,
            crops=(),
            vector_augment_strength=0.1,  # vectors: the strength of config.augment's mode
        )
    )
    # init: flax | pytorch | deepcluster (dcjax/models/init.py); the random filters matter.
    # neck: () or (hidden, out), fc-bn-relu-(dropout)-fc(-relu) on the features (ODC's on
    # ResNet-50); neck_style: "openselfsup" (its NonLinearNeckV0) or "dcjax" (models/network.py).
    config.model = ml_collections.ConfigDict(
        dict(
            name="small_cnn",
            sobel=False,
            kwargs={},
            init="flax",
            neck=(),
            neck_style="openselfsup",
        )
    )
    config.optim = ml_collections.ConfigDict(
        dict(
            optimizer="sgd",  # sgd | lars
            learning_rate=0.05,
            momentum=0.9,
            head_momentum=0.0,  # None: the trunk's momentum, read when the optimisers are built
            weight_decay=1e-5,
        )
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            probe_layer="features",
            knn_layer="features",
            knn_k=20,
            probe_epochs=30,
            probe_batch_size=128,
            probe_learning_rate=1e-3,
            # More probes, reported as probe_accuracy/<layer>; "a+b" probes a and b concatenated.
            extra_probe_layers=(),
            # The probes and kNN fit on this many train examples drawn with the seed (0 = all):
            # ImageNet's 1.28 M x 9,600 conv features do not fit in memory.
            train_examples=0,
            # "deepdive" adds the deep-dive authors' probe (dcjax/evaluation/deepdive_probe.py)
            # on probe_layer beside ours: SGD, batch 256, 20 epochs, flipped train views.
            protocol="dcjax",
            deepdive=ml_collections.ConfigDict(
                dict(
                    epochs=20,
                    batch_size=256,
                    test_batch_size=128,
                    learning_rate=0.01,
                    momentum=0.9,
                    weight_decay=1e-4,
                    flip=True,
                )
            ),
            # "sela" adds SeLa's official kNN on knn_layer (dcjax/evaluation/sela_knn.py):
            # after a ReLU, 10 neighbours weighted exp(similarity / 0.1), raw and after PCA-128;
            # with probes=True also its eval_linear_probes.py (dcjax/evaluation/sela_probe.py):
            # max-pool + BN + linear on conv1..conv5, 36 epochs through the frozen network, an
            # evaluation job of its own: python -m dcjax.evaluate --config.eval.protocol=sela
            # --config.eval.sela.probes=true
            sela=ml_collections.ConfigDict(
                dict(
                    k=10,
                    temperature=0.1,
                    relu=True,
                    pca_dim=128,
                    probes=False,
                    probe_layers=("relu1", "relu2", "relu3", "relu4", "relu5"),
                    # (window, stride, padding) of each layer's max-pool downsampler
                    probe_pools=((6, 6, 3), (4, 4, 0), (3, 3, 1), (3, 3, 1), (2, 2, 0)),
                    probe_epochs=36,
                    probe_batch_size=192,
                    probe_test_batch_size=16,  # the official 19 (memory only)
                    probe_learning_rates=(1e-2, 1e-3, 1e-4, 1e-5),
                    probe_lr_drop_epochs=(10, 20, 30),  # 0-based epochs where the next starts
                    probe_momentum=0.9,
                    probe_weight_decay=1e-5,
                    probe_test_from_epoch=27,  # 1-based: the official 0-based epoch > 25
                    probe_resize=256,
                    probe_crop=224,
                    probe_tencrops=True,
                )
            ),
            # "deepcluster" adds DeepCluster's eval_linear.py probes on the pooled conv layers
            # (dcjax/evaluation/deepcluster_probe.py): 90 epochs through the frozen network, an
            # evaluation job of its own: python -m dcjax.evaluate --config.eval.protocol=deepcluster
            deepcluster=ml_collections.ConfigDict(
                dict(
                    layers=("probe1", "probe2", "probe3", "probe4", "probe5"),
                    epochs=90,
                    batch_size=256,
                    test_batch_size=128,
                    learning_rate=0.01,
                    momentum=0.9,
                    weight_decay=1e-7,  # eval_linear.sh's --wd -7 (the argparse default is 1e-4)
                    resize=256,
                    crop=224,
                    tencrops=True,
                    test_every_epochs=1,
                )
            ),
            # "swav" adds SwAV's eval_linear.py (dcjax/evaluation/swav_probe.py): a linear layer
            # on the globally pooled layer (""= probe_layer), SGD 0.3 with a cosine rate, 100
            # epochs through the frozen network, best top-1 over the epochs; an evaluation job
            # of its own: python -m dcjax.evaluate --config.eval.protocol=swav
            swav=ml_collections.ConfigDict(
                dict(
                    layer="",
                    epochs=100,
                    batch_size=256,  # 32 per process x 8
                    test_batch_size=256,  # memory only
                    learning_rate=0.3,
                    final_lr=0.0,
                    momentum=0.9,
                    weight_decay=1e-6,
                    resize=256,
                    crop=224,
                    test_every_epochs=1,
                )
            ),
            # "openselfsup" adds OpenSelfSup's linear classification benchmark, "ImageNet (Last)"
            # (dcjax/evaluation/openselfsup_probe.py): a linear layer on the globally pooled layer
            # (""= probe_layer), SGD 30 with the rate x0.1 at epochs 60 and 80, 100 epochs
            # through the frozen network, best top-1 over the epochs (the initial weights
            # included); an evaluation job of its own:
            # python -m dcjax.evaluate --config.eval.protocol=openselfsup
            openselfsup=ml_collections.ConfigDict(
                dict(
                    layer="",
                    epochs=100,
                    batch_size=256,  # 32 per GPU x 8
                    test_batch_size=256,  # memory only
                    learning_rate=30.0,
                    momentum=0.9,
                    weight_decay=0.0,
                    lr_drop_epochs=(60, 80),  # 0-based epochs from which the rate is x factor
                    lr_drop_factor=0.1,
                    resize=256,
                    crop=224,
                    test_every_epochs=1,
                    test_initial=True,
                )
            ),
        )
    )
    config.checkpoint = ml_collections.ConfigDict(dict(keep=2))
    return config


def apply_smoke(config: ml_collections.ConfigDict, variants: set[str] = frozenset()) -> None:
    """Shrinks ``config`` in place to a run of seconds: 2 cycles on a tiny subset.

    With ``imagenet`` in ``variants``, the ``imagenet,smoke`` form: the same networks' structure
    and 224-px inputs on a tiny folder (the tests generate one), 1 cycle, batch 8.
    """
    config.num_cycles = 2
    config.data.max_train_examples = 256
    config.data.max_test_examples = 128
    config.batch_size = 32
    config.eval_batch_size = 64
    config.eval.probe_epochs = 2
    config.eval.knn_k = 5
    config.figures = False  # the figures have their own test
    if "imagenet" in variants:
        config.num_cycles = 1
        config.batch_size = 8
        config.eval_batch_size = 8
        config.steps_per_call = 0
        config.eval.update(train_examples=0, probe_batch_size=8, probe_epochs=1)
        config.eval.deepcluster.update(epochs=1, batch_size=8, test_batch_size=8)
        config.eval.sela.update(probe_epochs=1, probe_batch_size=8, probe_test_batch_size=8)
        config.eval.swav.update(epochs=1, batch_size=8, test_batch_size=8)
        config.eval.openselfsup.update(epochs=1, batch_size=8, test_batch_size=8)


def apply_cifar10(config: ml_collections.ConfigDict) -> None:
    """Sets ``config`` in place to the deep-dive paper's CIFAR-10 trunk and optimiser.

    An image folder (``data.path`` = a dir with ``train/`` and ``test/``), mini-AlexNet with
    Sobel, SGD lr 0.1, momentum 0.9, wd 1e-3, batch 64, crop_flip, 100 cycles, probe on relu5.
    Every method's cifar10 variant starts here, so they compare at the same budget.
    """
    config.data.source = "folder"
    config.model.update(name="mini_alexnet", sobel=True)
    config.optim.update(learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
    config.batch_size = 64
    config.num_cycles = 100
    config.augment = "crop_flip"
    config.input.update(image_size=32, crop_scale=(0.08, 1.0))
    config.eval.update(probe_layer="relu5", probe_epochs=20, probe_batch_size=256)


# torchvision's ImageNet statistics (the seeds' Normalize), so no pass over 1.28 M images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def apply_imagenet(config: ml_collections.ConfigDict, variants: set[str]) -> None:
    """Sets ``config`` in place to the seeds' ImageNet data and evaluation.

    ``data.path``: the folder holding ``train/`` and ``val/`` (one sub-folder per class), whose
    JPEGs are decoded once at 224 x 224 (shorter side 224, centre crop; cached, memory-mapped)
    or, with the ``tfds`` variant, TFDS's ``imagenet2012`` (``data.path`` = its data_dir, the
    archives in ``<data_dir>/downloads/manual``). Training crops are RandomResizedCrop(224) of
    that square (the reference crops the full image); the clustering and probe view is the
    square itself (the reference's Resize 256 + CenterCrop 224 keeps 87.5 % of the side).
    ImageNet's normalisation; a jitted call runs 100 steps; the probes and kNN fit on 100,000
    train images drawn with the seed (eval.train_examples) and score the 50,000 val images.
    """
    if "tfds" in variants:
        config.data.update(source="tfds", name="imagenet2012", test_split="validation")
    else:
        config.data.source = "folder"
    config.input.update(
        image_size=224, crop_scale=(0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    config.augment = "crop_flip"
    config.batch_size = 256
    config.eval_batch_size = 256
    config.steps_per_call = 100
    config.figures = False  # t-SNE and cluster grids are for small data
    config.eval.update(train_examples=100_000, probe_epochs=10, probe_batch_size=1024)


def apply_vectors(config: ml_collections.ConfigDict) -> None:
    """Sets ``config`` in place to vector data (``dcjax.data.vectors``) and an MLP, no
    augmentation (the domain-agnostic setting).

    Default data: scikit-learn's digits as 64-d vectors (``sklearn:digits``, no download);
    ``--config.data.path`` takes a .npy/.npz/.csv file, ``sklearn:<name>`` or ``idx:<dir>``.
    The MLP: hidden 256-256-128-128 with batch norm, 64 features.
    """
    config.data.update(source="vectors", path="sklearn:digits")
    config.model.update(
        name="mlp",
        sobel=False,
        kwargs={"widths": (256, 256, 128, 128), "feature_dim": 64},
        init="flax",
    )
    config.augment = "none"
    config.input.update(image_size=0)
    config.eval.update(probe_layer="features", knn_layer="features", extra_probe_layers=())
