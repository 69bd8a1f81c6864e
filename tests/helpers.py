"""Helpers shared by the tests: loading config files and building small runs."""

from __future__ import annotations

import os
import re
import zipfile

from dcjax.config_base import load_config  # noqa: F401  (re-exported for the tests)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_files() -> list[str]:
    """Names of every config file under configs/."""
    return sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))


def cifar_zip() -> str | None:
    """The CIFAR-10 JPEG zip from $DCJAX_CIFAR10_ZIP or ../shared/datasets/, or None."""
    candidates = [
        os.environ.get("DCJAX_CIFAR10_ZIP", ""),
        os.path.join(os.path.dirname(REPO), "shared", "datasets", "cifar10-jpg.zip"),
    ]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


CIFAR_SKIP_REASON = (
    "CIFAR-10 zip absent: set DCJAX_CIFAR10_ZIP or put ../shared/datasets/cifar10-jpg.zip"
)


def extract_cifar_subset(root: str, per_class: int, num_classes: int = 10) -> list[str]:
    """Copies the first ``per_class`` JPEGs of the first ``num_classes`` classes of both splits
    (zip layout ``{train,test}/<class>/NNNN.jpg``) to ``root``; returns the class names."""
    pattern = re.compile(r"^(?:.*/)?(train|test)/([^/]+)/([^/]+\.jpg)$")
    with zipfile.ZipFile(cifar_zip()) as archive:
        members = [(m, pattern.match(m.filename)) for m in archive.infolist()]
        members = sorted(((m, match.groups()) for m, match in members if match), key=lambda x: x[1])
        classes = sorted({c for _, (split, c, _) in members if split == "train"})[:num_classes]
        taken: dict[tuple[str, str], int] = {}
        for member, (split, class_name, file_name) in members:
            if class_name in classes and taken.get((split, class_name), 0) < per_class:
                taken[(split, class_name)] = taken.get((split, class_name), 0) + 1
                target = os.path.join(root, split, class_name, file_name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(archive.read(member))
    return classes


def load_experiment(name: str):
    """``experiments/<name>.py`` as a module (its flags are defined only when run as a script)."""
    import importlib.util
    import sys

    path = os.path.join(REPO, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def train_step(run):
    """``make_train_step`` for a built run (``setup.build_run``), one step per call."""
    from dcjax.training.step import make_train_step

    return make_train_step(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )


# The normalisation of the one-colour runs below (any values that are not ImageNet's).
ONE_COLOUR_MEAN, ONE_COLOUR_STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def run_on_one_colour_images(rng, make_probe, variables, *, n=37, m=19, side=12, seed=5):
    """Runs an official linear protocol's runner (``training.bank_probe.BankProbe``) on n train
    and m test images of one colour each, whose every crop and flip is the same view, so that a
    NumPy replay can follow the run. Labels: 3 classes from the colour; banks spread over every
    device (the 8 simulated ones).

    Args:
      make_probe: ``mesh -> runner`` (normalisation ``ONE_COLOUR_MEAN`` / ``ONE_COLOUR_STD``).

    Returns:
      (the runner's result, (n + m, 3) float64 normalised colours, (n + m,) labels).
    """
    import numpy as np

    from dcjax.core.mesh import make_mesh
    from dcjax.data.bank import place_bank

    colours = rng.integers(0, 256, (n + m, 3))
    labels = (colours[:, 0] > 128).astype(int) + (colours[:, 1] > 128)
    images = np.broadcast_to(colours[:, None, None], (n + m, side, side, 3)).astype(np.uint8)
    mesh = make_mesh(0)
    result = make_probe(mesh)(
        variables,
        place_bank(images[:n], mesh),
        labels[:n],
        place_bank(images[n:], mesh),
        labels[n:],
        num_classes=3,
        seed=seed,
    )
    x = (colours / 255.0 - np.asarray(ONE_COLOUR_MEAN)) / np.asarray(ONE_COLOUR_STD)
    return result, x, labels


def assert_matches_replay(result, tested_epochs, train_loss, tested, num_test: int) -> None:
    """A one-colour run's ``LayerScores`` equal its NumPy replay: ``train_loss`` layer -> (E,)
    epoch means, ``tested`` layer -> [(top-1, test loss)] per tested epoch; 3 classes, so every
    top-5 (top-3) is a hit. Top-1 may differ by one image (a float32 tie at the argmax)."""
    import numpy as np

    np.testing.assert_array_equal(result.epochs, tested_epochs)
    for k in train_loss:
        np.testing.assert_allclose(result.train_loss[k], train_loss[k], rtol=2e-4)
        np.testing.assert_allclose(result.top1[k], [a for a, _ in tested[k]], atol=1.5 / num_test)
        np.testing.assert_allclose(result.test_loss[k], [b for _, b in tested[k]], rtol=2e-4)
        np.testing.assert_array_equal(result.top5[k], np.ones(len(tested_epochs)))
