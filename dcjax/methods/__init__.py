"""Methods, each made by its module's ``make_method(config)``; ``config.method.name`` picks one.

Variants are fields of ``config.method``, not names: DeepCluster-v2 with self-distillation is
``deepcluster_v2`` with ``self_distillation=True``, CODC is ``odc`` with ``backbones``.
"""

from collections.abc import Callable

import ml_collections

from dcjax.core.errors import ConfigError
from dcjax.methods import deepcluster, deepcluster_v2, odc, sela
from dcjax.methods.base import Context, LabelledState, Method

__all__ = ["FACTORIES", "Context", "LabelledState", "Method", "make_method"]

FACTORIES: dict[str, Callable[[ml_collections.ConfigDict], Method]] = {
    "deepcluster": deepcluster.make_method,
    "deepcluster_v2": deepcluster_v2.make_method,
    "odc": odc.make_method,
    "sela": sela.make_method,
}

_RENAMED = {
    "deepcluster_v2_kd": "method.name='deepcluster_v2' with method.self_distillation=True",
    "codc": "method.name='odc' with method.backbones naming the trunks",
}


def make_method(config: ml_collections.ConfigDict) -> Method:
    """The method ``config.method.name`` names, built from ``config``.

    Raises:
      ConfigError: naming ``config.method.name`` when unknown, or the bad ``config.method`` field.
    """
    name = config.method.name
    if name in _RENAMED:
        raise ConfigError(f"config.method.name={name!r} is now {_RENAMED[name]}")
    if name not in FACTORIES:
        raise ConfigError(
            f"config.method.name={name!r} is unknown; choose one of {sorted(FACTORIES)}"
        )
    return FACTORIES[name](config)
