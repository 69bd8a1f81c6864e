"""Helpers shared by the tests: loading config files and building small runs."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config(arg)``, as the command line loads it."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def config_files() -> list[str]:
    """Names of every config file under configs/."""
    return sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
