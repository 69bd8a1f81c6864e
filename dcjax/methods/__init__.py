"""Methods, registered by name: ``config.method.name`` picks one."""

from dcjax.methods import deepcluster, deepcluster_v2, odc, sela
from dcjax.methods.base import Context, Method

__all__ = ["METHODS", "Context", "Method", "get_method"]

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        deepcluster.METHOD,
        sela.METHOD,
        deepcluster_v2.METHOD,
        deepcluster_v2.KD_METHOD,
        odc.METHOD,
        odc.CODC_METHOD,
    )
}


def get_method(name: str) -> Method:
    """The method registered as ``name``; ValueError naming ``config.method.name`` otherwise."""
    if name not in METHODS:
        raise ValueError(f"config.method.name={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name]
