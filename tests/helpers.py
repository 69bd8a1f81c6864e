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
