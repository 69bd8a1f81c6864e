"""CODC from earlier runs of other methods, as configs/codc.py documents it: the digits recipe's
commands run as written (at smoke size) and CODC's trunks start as the source runs' trunks, with
and without a neck; the CIFAR-10 and ImageNet recipes' runs fit CODC's trunks (shapes only)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from dcjax.methods import make_method, odc
from dcjax.models.pretrained import plain_trunk, restore_trunk
from dcjax.training.setup import build_run
from dcjax.training.state import learning_rate_schedule
from tests.helpers import REPO, load_config

# Each recipe's runs, and what its CODC trunks take from them, by trunk.
RECIPES = {
    "digits": ((8, 8, 1), ("trunk", "trunk")),
    "CIFAR-10": ((32, 32, 3), ("trunk", "trunk")),
    "ImageNet": ((224, 224, 3), ("backbone", "backbone")),  # runs without a neck
}


def _recipe(name: str) -> list[list[str]]:
    """The commands of configs/codc.py's "Recipe, <name>" paragraph, each as its argv."""
    spec = importlib.util.spec_from_file_location(
        "codc_config", os.path.join(REPO, "configs/codc.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paragraphs = module.__doc__.split("\n\n")
    (paragraph,) = [p for p in paragraphs if p.startswith(f"Recipe, {name} ")]
    text = paragraph.replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("python")]
    argvs = [shlex.split(command) for command in commands]
    assert argvs and all(argv[:3] == ["python", "-m", "dcjax.main"] for argv in argvs)
    return [argv[3:] for argv in argvs]


def test_readme_shows_the_digits_recipe_of_the_config():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    commands = [
        shlex.split(line)[3:]
        for line in text.splitlines()
        if line.startswith("python -m dcjax.main") and "codc-digits" in line
    ]
    assert commands == _recipe("digits")


def _smoke(argv: list[str], root: str) -> list[str]:
    """A documented command at smoke size, its runs under ``root``: ``--config FILE[:v]`` gains
    the ``smoke`` variant and every ``runs/`` path moves to ``root/runs/``."""
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--config":
            arg += ",smoke" if ":" in arg else ":smoke"
        out.append(arg.replace("runs/", os.path.join(root, "runs") + "/"))
    return out


def _config(argv: list[str]):
    """The ConfigDict ``python -m dcjax.main <argv>`` runs (its flags, without --workdir)."""
    args = ["main", *(a for a in argv if not a.startswith("--workdir"))]
    values = flags.FlagValues()  # the overrides are read from sys_argv, as from sys.argv
    holder = config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=args
    )
    values(args)
    return holder.value


def _workdir(argv: list[str]) -> str:
    (arg,) = [a for a in argv if a.startswith("--workdir=")]
    return arg.split("=", 1)[1]


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_digits_recipe_runs_as_documented_and_starts_codc_from_both_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = [_smoke(argv, str(tmp_path)) for argv in _recipe("digits")]
    *sources, codc_argv = commands
    assert len(sources) == 2 and "configs/codc.py:smoke" in codc_argv
    methods = [_config(argv).method.name for argv in sources]
    assert methods[0] != methods[1] and "odc" not in methods  # two other methods
    for argv in commands:  # what a user types, CODC's last (it needs the two runs)
        done = subprocess.run(
            [sys.executable, "-m", "dcjax.main", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (argv, done.stderr[-3000:])
        assert os.path.isfile(os.path.join(_workdir(argv), "results.json"))

    config = _config(codc_argv)
    assert list(config.method.init_workdirs) == [_workdir(argv) for argv in sources]
    runs = [restore_trunk(_workdir(argv)) for argv in sources]
    initial = build_run(config).initial_state  # what the CODC run started from
    for i, (params, stats) in enumerate(runs):
        _assert_trees_equal(initial.params["trunk"][f"trunks_{i}"], params)
        _assert_trees_equal(initial.batch_stats["trunk"][f"trunks_{i}"], stats)

    # The same runs under trunks with a neck: their backbones, the necks as initialised.
    config.model.neck = (16, 8)
    with_neck = build_run(config).initial_state
    config.method.init_workdirs = ("", "")
    fresh = build_run(config).initial_state
    for i, (params, stats) in enumerate(runs):
        key = f"trunks_{i}"
        trunk, fresh_trunk = with_neck.params["trunk"][key], fresh.params["trunk"][key]
        assert set(trunk) == set(fresh_trunk) > {"backbone"}
        _assert_trees_equal(trunk["backbone"], params["backbone"])
        _assert_trees_equal(with_neck.batch_stats["trunk"][key]["backbone"], stats["backbone"])
        for name in set(trunk) - {"backbone"}:
            _assert_trees_equal(trunk[name], fresh_trunk[name])


def _trunk_shapes(config, image_shape, key=None):
    """(params, batch_stats) shapes of the trunk ``config``'s run trains (``key``: CODC's)."""
    model = make_method(config).model
    x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False)
    )
    params, stats = variables["params"]["trunk"], variables.get("batch_stats", {}).get("trunk", {})
    if key is None:
        return plain_trunk(params), plain_trunk(stats)
    return params[key], stats.get(key, {})


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipes_runs_fit_codc_trunks(name, monkeypatch):
    monkeypatch.chdir(REPO)
    image_shape, taken = RECIPES[name]
    *sources, codc_argv = _recipe(name)
    codc = _config(codc_argv)
    assert list(codc.method.init_workdirs) == [_workdir(argv) for argv in sources]
    for i, argv in enumerate(sources):
        source = _trunk_shapes(_config(argv), image_shape)
        trunk = _trunk_shapes(codc, image_shape, key=f"trunks_{i}")
        *_, what = odc.start_trunk(source, trunk, field=f"init_workdirs[{i}]", backbone=str(i))
        assert what == taken[i], (argv, what)


def test_imagenet_config_follows_the_reports_codc_schedule():
    # "trained for 100K iterations with a constant learning rate 0.01", K = 1K (and 4K).
    config = load_config("codc", "imagenet")
    steps_per_epoch = 1_281_167 // config.batch_size
    iterations = config.num_cycles * steps_per_epoch
    assert 100_000 <= iterations < 100_000 + steps_per_epoch
    rate = learning_rate_schedule(config, steps_per_epoch)  # a float: constant
    assert rate == pytest.approx(0.01) and not callable(rate)
    assert config.method.num_clusters == 1000
    assert tuple(config.method.backbones) == ("resnet50", "resnet50")
    assert tuple(config.model.neck) == (512, 256)
