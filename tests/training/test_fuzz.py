"""Fuzz tests (hypothesis): bad config values and malformed data files end in a ``UserError``
naming the field or file, never in an exception from deep inside JAX, Flax or NumPy.

``check_config`` is the whole validation a run does before it writes or compiles anything
(``build_run`` and so ``loop.run`` call it first); it traces the model without allocating it, so
each case costs a fraction of a second. The counts of cases tried are printed (``-s``) and go
into the issue notes.
"""

import functools
import gzip
import math
import os
import struct

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcjax.core.errors import UserError
from dcjax.data import sources
from dcjax.data.dataset import DataError
from dcjax.training.setup import check_config
from tests.helpers import load_config

# More cases for a thorough sitting: DCJAX_FUZZ_EXAMPLES=400 pytest tests/training/test_fuzz.py -s
EXAMPLES = int(os.environ.get("DCJAX_FUZZ_EXAMPLES", "45"))
CONFIGS = ("deepcluster", "sela", "odc", "codc", "deepcluster_v2", "deepcluster_v2_kd")
SIGNED = {"method.sinkhorn.min_log_ratio"}
_TRIED = {"config": 0, "rejected": 0, "data": 0}


@functools.cache
def _smoke_base(name: str) -> ml_collections.ConfigDict:
    config = load_config(name, "smoke")
    config.num_devices = 1
    return config


def _smoke(name: str) -> ml_collections.ConfigDict:
    return _smoke_base(name).copy_and_resolve_references()


def _numeric_fields(config, prefix=""):
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _numeric_fields(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(f"{prefix}{key}")
    return sorted(out)


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value


def _bad_values(is_int: bool):
    """What a user can type for a number: its type's boundaries, extremes and (floats) NaN/inf."""
    edges = st.sampled_from([-1, 0, 1, -(2**31), 2**31, 10**9])
    if is_int:
        return edges | st.integers(-(10**6), 10**6)
    return edges.map(float) | st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_number_in_any_config_is_checked_or_accepted(data):
    name = data.draw(st.sampled_from(CONFIGS), label="config")
    config = _smoke(name)
    field = data.draw(st.sampled_from(_numeric_fields(config)), label="field")
    old = eval(f"config.{field}")  # noqa: S307 - a dotted path of our own config
    value = data.draw(_bad_values(isinstance(old, int)), label="value")
    _set(config, field, value)
    _TRIED["config"] += 1
    try:
        check_config(config)
    except UserError as error:
        _TRIED["rejected"] += 1
        message = str(error)
        leaf = field.rsplit(".", 1)[-1]
        assert leaf in message or field in message, f"{field}={value!r}: {message}"
        return
    # Accepted: it must be a value the field can hold.
    assert math.isfinite(value), f"{name}: {field}={value!r} was accepted"
    assert value >= 0 or field in SIGNED, f"{name}: {field}={value!r} was accepted"


def _idx_bytes(payload: bytes, magic: int, dims: tuple[int, ...]) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


@settings(
    max_examples=max(EXAMPLES // 2, 10), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kind=st.sampled_from(["npz", "idx", "idx_gz", "png"]),
    payload=st.binary(max_size=300),
    count=st.integers(0, 20),
    cut=st.integers(0, 64),
)
def test_malformed_data_files_are_named(tmp_path_factory, kind, payload, count, cut):
    root = tmp_path_factory.mktemp("data")
    config = ml_collections.ConfigDict(
        dict(
            source={"npz": "npz", "idx": "idx", "idx_gz": "idx", "png": "folder"}[kind],
            path=str(root),
            name="",
            cache_dir=str(root / "cache"),
            max_train_examples=0,
            max_test_examples=0,
            seed=0,
            test_fraction=0.25,
            class_fractions=(),
        )
    )
    if kind == "npz":
        path = root / "data.npz"
        path.write_bytes(payload)
        config.path = str(path)
        bad = str(path)
    elif kind.startswith("idx"):
        images = _idx_bytes(payload, 0x00000803, (count, 28, 28))
        labels = _idx_bytes(bytes(range(count))[: max(count - cut, 0)], 0x00000801, (count,))
        suffix = ".gz" if kind == "idx_gz" else ""
        write = gzip.compress if suffix else (lambda b: b)
        images = write(images)
        (root / f"train-images-idx3-ubyte{suffix}").write_bytes(images[: len(images) - cut])
        (root / f"train-labels-idx1-ubyte{suffix}").write_bytes(write(labels))
        bad = "idx"
    else:
        for c in ("a", "b"):
            (root / "train" / c).mkdir(parents=True)
            (root / "train" / c / "0.png").write_bytes(payload)
        bad = "0.png"
    _TRIED["data"] += 1
    try:
        dataset = sources.load(config)
    except DataError as error:
        assert bad in str(error) or str(root) in str(error), str(error)
        return
    # Accepted only when the bytes happen to form valid data.
    assert len(dataset.train_images) > 0


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(
        f"\nfuzz: {_TRIED['config']} config cases ({_TRIED['rejected']} rejected with the field "
        f"named, the rest valid), {_TRIED['data']} malformed data cases"
    )
