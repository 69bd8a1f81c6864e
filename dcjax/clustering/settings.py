"""Config fields for the clustering kernels' settings (``KMeansConfig``, ``SinkhornConfig``).

A method's config holds ``method.kmeans`` / ``method.sinkhorn``: one field per field of the
dataclass, so every kernel option can be set from a config file or the command line
(``--config.method.kmeans.n_redo=3``). ``fields`` builds the sub-config with the kernel's
defaults and a method's own, ``settings`` turns it back into the dataclass.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from dcjax.core.errors import ConfigError

__all__ = ["fields", "settings"]


def fields(cls: type, **overrides) -> ml_collections.ConfigDict:
    """A sub-config with one entry per field of the dataclass ``cls``: its default, or
    ``overrides``' value.

    Fields whose value is None become typed placeholders (``chunk_size``), so they can be set
    from the command line. ``type_safe=False``: fields such as Sinkhorn's ``lse_mode`` take
    values of more than one type (True, False, "auto").

    Raises:
      TypeError: an override names no field of ``cls``.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(overrides) - set(names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        value = overrides.get(f.name, f.default)
        values[f.name] = config_dict.placeholder(int) if value is None else value
    return ml_collections.ConfigDict(values, type_safe=False)


def settings(cls: type, sub_config: ml_collections.ConfigDict | None, where: str):
    """``cls(**sub_config)``; ``where`` names the sub-config (``"config.method.kmeans"``).

    Raises:
      ValueError: the sub-config is missing, names unknown fields, or a value is invalid; the
        message names ``where`` and the field.
    """
    if sub_config is None:
        raise ConfigError(f"{where} is missing: the method needs its {cls.__name__} fields")
    values = sub_config.to_dict()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where} has unknown fields {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
