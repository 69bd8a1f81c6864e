"""The kernels' settings as config fields: one field per dataclass field, in every method config."""

from __future__ import annotations

import dataclasses

import pytest

from dcjax.clustering import settings
from dcjax.clustering.kmeans import KMeansConfig
from dcjax.clustering.sinkhorn import SinkhornConfig
from dcjax.config_base import load_config
from dcjax.methods.base import kmeans_config, sinkhorn_config


@pytest.mark.parametrize("cls", [KMeansConfig, SinkhornConfig])
def test_fields_round_trip_to_the_dataclass_defaults(cls):
    sub = settings.fields(cls)
    assert sorted(sub) == sorted(f.name for f in dataclasses.fields(cls))
    assert settings.settings(cls, sub, "x") == cls()


def test_overrides_and_none_fields_are_settable():
    sub = settings.fields(KMeansConfig, num_iters=7, init="kmeans++")
    sub.chunk_size = 4096  # a None default is a typed placeholder: settable later
    sub.n_redo = 3
    got = settings.settings(KMeansConfig, sub, "x")
    assert got == KMeansConfig(num_iters=7, init="kmeans++", chunk_size=4096, n_redo=3)
    lse = settings.fields(SinkhornConfig)
    lse.lse_mode = True  # True, False or "auto": more than one type
    assert settings.settings(SinkhornConfig, lse, "x").lse_mode is True
    with pytest.raises(TypeError, match="no fields"):
        settings.fields(KMeansConfig, iters=3)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_redo=0), "config.method.kmeans: n_redo must be an int >= 1"),
        (dict(init="pp"), "config.method.kmeans: init must be one of"),
        (dict(niter=3), r"config.method.kmeans has unknown fields \['niter'\]"),
    ],
)
def test_bad_kmeans_fields_are_named(change, message):
    config = load_config("deepcluster")
    with config.method.kmeans.unlocked():
        config.method.kmeans.update(change)
    with pytest.raises(ValueError, match=message):
        kmeans_config(config)


def test_bad_or_missing_sinkhorn_fields_are_named():
    config = load_config("sela")
    config.method.sinkhorn.epsilon = -1.0
    with pytest.raises(ValueError, match="config.method.sinkhorn: epsilon must be > 0"):
        sinkhorn_config(config)
    with pytest.raises(ValueError, match="config.method.sinkhorn is missing"):
        sinkhorn_config(load_config("deepcluster"))


@pytest.mark.parametrize(
    "name, field, cls",
    [
        ("deepcluster", "kmeans", KMeansConfig),
        ("deepcluster_v2", "kmeans", KMeansConfig),
        ("deepcluster_v2_kd", "kmeans", KMeansConfig),
        ("odc", "kmeans", KMeansConfig),
        ("codc", "kmeans", KMeansConfig),
        ("sela", "sinkhorn", SinkhornConfig),
    ],
)
def test_every_method_config_has_the_whole_sub_config(name, field, cls):
    sub = load_config(name).method[field]
    assert sorted(sub) == sorted(f.name for f in dataclasses.fields(cls))
    assert isinstance(settings.settings(cls, sub, field), cls)
