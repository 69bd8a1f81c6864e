"""Builds everything a run needs from its config: mesh, data on device, model, method, state."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dcjax.config_base import dotted_fields
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import make_mesh, replicated
from dcjax.data import sources
from dcjax.data.bank import ImageBank, place_bank
from dcjax.data.pipeline import Pipeline, make_pipeline
from dcjax.evaluation import sela_probe
from dcjax.evaluation.deepcluster_probe import DeepclusterProbeConfig
from dcjax.evaluation.deepdive_probe import DeepdiveProbeConfig
from dcjax.evaluation.openselfsup_probe import OpenselfsupProbeConfig
from dcjax.evaluation.pooled_probe import PooledProbeConfig
from dcjax.evaluation.sela_knn import SelaKnnConfig
from dcjax.evaluation.swav_probe import SwavProbeConfig
from dcjax.methods import Context, Method, make_method
from dcjax.models.init import apply_init_scheme
from dcjax.training.state import TrainState, make_optimizers

__all__ = [
    "Run",
    "build_run",
    "check_config",
    "check_fields",
    "check_numbers",
    "deepdive_probe_config",
    "eval_layers",
    "eval_protocol",
    "fresh_initial_state",
    "init_variables",
    "openselfsup_probe",
    "pooled_probe",
    "sela_probes",
    "swav_probe",
]


@dataclasses.dataclass(frozen=True)
class Run:
    """The static parts of a run, the state's shardings and its random-init state.

    ``initial_state`` is the network at random initialisation, as ``build_run`` made it; the
    training loop evaluates it, starts from it and then drops it (``None``), so that no copy of
    the random-init network stays in memory while training; ``fresh_initial_state`` makes the
    same state again when it is needed later (the figures).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    dataset: sources.Dataset
    pipeline: Pipeline
    method: Method
    ctx: Context
    train_images: ImageBank  # (N, H, W, C) uint8, rows sharded over the data axis
    test_images: ImageBank | None  # (M, H, W, C) uint8, sharded likewise, or None
    # Everything replicated except what the method's ``state_sharding`` splits.
    state_sharding: TrainState
    initial_state: TrainState | None  # the random-init state, placed; None once dropped


def _check_batch(config: ml_collections.ConfigDict, mesh: Mesh, num_examples: int) -> None:
    num_devices = mesh.devices.size
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        if size < 1 or size % num_devices:
            raise ConfigError(
                f"config.{field}={size} must be a positive multiple of the {num_devices} devices"
            )
    steps_per_call = config.get("steps_per_call", 0)
    if (
        isinstance(steps_per_call, bool)
        or not isinstance(steps_per_call, int)
        or steps_per_call < 0
    ):
        raise ConfigError(
            f"config.steps_per_call={steps_per_call!r} must be an int >= 0 (0 = a whole epoch)"
        )
    if config.batch_size > num_examples:
        data = config.data
        shaping = ", ".join(
            f"{field}={data[field]}"
            for field in ("source", "test_fraction", "max_train_examples", "class_fractions")
            if field in data
        )
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {num_examples} training "
            f"examples left by config.data ({shaping})"
        )


def _int_in(config: ml_collections.ConfigDict, field: str, low: int, high: int | None = None):
    """Raises ConfigError naming ``config.<field>`` unless it is an int in [low, high]."""
    value = config
    for part in field.split("."):
        value = value[part]
    bad = isinstance(value, bool) or not isinstance(value, int | np.integer)
    if bad or value < low or (high is not None and value > high):
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ConfigError(f"config.{field}={value!r} must be {allowed}")


# The one number that may be negative (a log-ratio); every other one must be >= 0 (seeds too:
# NumPy's generators refuse negative ones).
_SIGNED_FIELDS = frozenset({"method.sinkhorn.min_log_ratio"})
# Fields confined to an interval: (low, high, whether high is allowed).
_INTERVALS = {
    "optim.momentum": (0.0, 1.0, False),
    "optim.head_momentum": (0.0, 1.0, False),
    "method.distill_alpha": (0.0, 1.0, True),
    "data.test_fraction": (0.0, 1.0, False),
    # Sides in pixels: far beyond any data set here, small enough that one batch cannot take
    # the whole memory before the first step.
    "input.image_size": (0, 4097, False),
    "input.eval_resize": (0, 4097, False),
    "input.pad": (0, 4097, False),  # per side: the padded image is larger still
    # SeLa's heads. The official runs use 10 (self-label's --hc); each head adds a (D, K) kernel
    # and an (N,) row of labels, which check_config's trace of init_state draws on the host (a
    # permutation of N per head: 0.09 s and 5 MB each at ImageNet's N = 1.28 M, so 9 s and
    # 0.5 GB at the cap). Unbounded, 2^31 heads took 13 GB and minutes before being stopped.
    "method.num_heads": (1, 100, True),
}


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every number in the config is finite, >= 0 (but the few signed fields) and within its
    interval where it has one.

    Raises:
      ConfigError: naming the first field that is not.
    """
    for field, value in dotted_fields(config.to_dict()).items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            continue
        if not np.isfinite(value):
            raise ConfigError(f"config.{field}={value!r} must be a finite number")
        if value < 0 and field not in _SIGNED_FIELDS:
            raise ConfigError(f"config.{field}={value!r} must be >= 0")
        if field in _INTERVALS:
            low, high, closed = _INTERVALS[field]
            if not (low <= value < high or (closed and value == high)):
                bracket = "]" if closed else ")"
                raise ConfigError(f"config.{field}={value!r} must be in [{low}, {high}{bracket}")


def _check_settings(config: ml_collections.ConfigDict) -> None:
    """The fields that need no data and that ``check_numbers``'s >= 0 lets through but that
    would fail only at the first evaluation or on resuming.

    Raises:
      ConfigError: naming ``config.checkpoint.keep``, ``config.optim.learning_rate`` or
        ``config.eval.probe_learning_rate``, its value and what is allowed.
    """
    keep = config.checkpoint.keep
    if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or keep < 1:
        raise ConfigError(
            f"config.checkpoint.keep={keep!r} must be an int >= 1 (the newest checkpoints and "
            "pseudo-label files kept): orbax deletes every checkpoint with 0, so the run "
            "could not resume"
        )
    for field, what in (
        ("optim.learning_rate", "the network"),
        ("eval.probe_learning_rate", "the dcjax probes"),
    ):
        group, leaf = field.split(".")
        value = config[group][leaf]
        number = isinstance(value, int | float | np.number) and not isinstance(value, bool)
        if not (number and value > 0):
            raise ConfigError(
                f"config.{field}={value!r} must be a number > 0 (with 0 {what} would never move)"
            )


def check_fields(config: ml_collections.ConfigDict, dataset: sources.Dataset) -> None:
    """The fields whose bad values would otherwise fail deep inside JAX or only after training.

    Checked against the loaded data, before the model is built: cycles and epochs, K against N,
    the probes' and kNN's sizes, and that the evaluation has at least two classes. The methods'
    own fields are checked by their ``make_method`` (before the data is read), and limits known
    only from the model's shapes (PCA against the feature width) by their ``init_state``.

    Raises:
      ConfigError: naming the field, its value and what is allowed.
    """
    n = len(dataset.train_images)
    _int_in(config, "num_cycles", 0)
    _int_in(config, "epochs_per_cycle", 1)
    method = config.method
    if "num_clusters" in method:
        _int_in(config, "method.num_clusters", 2, n)
    _int_in(config, "eval.knn_k", 1, n)
    _int_in(config, "eval.probe_epochs", 0)
    _int_in(config, "eval.probe_batch_size", 1)
    if dataset.train_labels is not None and len(np.unique(dataset.train_labels)) < 2:
        raise ConfigError(
            f"the training data ({dataset.name}) has labels of a single class: the probes need "
            "at least 2 (check config.data)"
        )


def init_variables(
    model, key: jax.Array, dummy: jax.Array | jax.ShapeDtypeStruct, scheme: str = "flax"
) -> dict:
    """The model's variables from ``key`` for inputs shaped like ``dummy``, with
    ``config.model.init``'s scheme on the params."""
    zeros = functools.partial(jnp.zeros, dummy.shape, dummy.dtype)
    variables = jax.jit(lambda k: model.init(k, zeros(), train=False))(key)
    params = apply_init_scheme(jax.random.fold_in(key, 1), variables["params"], scheme)
    return {**variables, "params": params}


def _random_variables(config, model, dummy: jax.ShapeDtypeStruct) -> dict:
    """The model's variables at random init, from ``config.seed``."""
    key_params, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    return init_variables(model, key_params, dummy, config.model.get("init", "flax"))


def _initial_variables(method: Method, ctx: Context, variables: dict) -> dict:
    """The method's changes to the random-init variables (trunks from earlier runs), if any."""
    if method.init_variables is None:
        return variables
    return method.init_variables(ctx, variables)


def _check_param_groups(variables: dict) -> None:
    """The methods' contract: the model's params are the groups ``trunk`` and ``head``."""
    groups = set(variables["params"])
    if groups != {"trunk", "head"}:
        raise ConfigError(
            f"the model's parameter groups are {sorted(groups)}; a method's model must name "
            "its submodules 'trunk' and 'head' (each gets its own optimizer)"
        )


def _train_state(config, variables: dict, method: Method, ctx: Context) -> TrainState:
    """Step and cycle 0, the variables, fresh optimiser states and the method's initial state."""
    _, key_state = jax.random.split(jax.random.PRNGKey(config.seed))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        cycle=jnp.zeros((), jnp.int32),
        params=dict(params),
        batch_stats=variables.get("batch_stats", {}),
        opt_state={group: tx.init(params[group]) for group, tx in ctx.optimizers.items()},
        rng=key_state,
        method=method.init_state(ctx),
    )


def _dummy_batch(pipeline: Pipeline, images: np.ndarray) -> jax.ShapeDtypeStruct:
    """The shape of one input batch (1, H, W, C): nothing is allocated for it."""
    return jax.ShapeDtypeStruct((1, *pipeline.input_shape(images.shape[1:])), jnp.float32)


def fresh_initial_state(run: Run) -> TrainState:
    """The random-init state again, equal to ``build_run``'s (the same keys), placed."""
    dummy = _dummy_batch(run.pipeline, run.dataset.train_images)
    variables = _random_variables(run.config, run.ctx.model, dummy)
    variables = _initial_variables(run.method, run.ctx, variables)
    state = _train_state(run.config, variables, run.method, run.ctx)
    return jax.device_put(state, run.state_sharding)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``check_config`` establishes without allocating a parameter or compiling a step."""

    mesh: Mesh
    method: Method
    dataset: sources.Dataset
    pipeline: Pipeline
    ctx: Context
    dummy: jax.ShapeDtypeStruct  # (1, H, W, C) the model's input shape


EVAL_PROTOCOLS = ("dcjax", "deepdive", "deepcluster", "sela", "swav", "openselfsup")


def eval_layers(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(field, layer) of every layer ``config.eval`` names: the probes' (a probe ``"a+b"``
    names a and b), then the kNN's."""
    eval_config = config.eval
    named = [("eval.probe_layer", eval_config.probe_layer)]
    named += [("eval.extra_probe_layers", x) for x in eval_config.get("extra_probe_layers", ())]
    named += [("eval.knn_layer", eval_config.knn_layer)]
    return [(field, part) for field, probe in named for part in str(probe).split("+")]


def eval_protocol(config: ml_collections.ConfigDict) -> str:
    """``config.eval.protocol``, checked; ConfigError naming it when unknown."""
    protocol = config.eval.get("protocol", "dcjax")
    if protocol not in EVAL_PROTOCOLS:
        raise ConfigError(
            f"config.eval.protocol={protocol!r} must be one of {', '.join(EVAL_PROTOCOLS)}"
        )
    if protocol == "deepdive" and config.eval.get("train_examples", 0):
        raise ConfigError(
            "config.eval.train_examples applies to the dcjax probes; the deep-dive protocol "
            "trains on the whole train split: set it to 0"
        )
    if protocol == "deepdive":
        deepdive_probe_config(config)
    if protocol == "deepcluster":
        DeepclusterProbeConfig.from_config(config.eval.get("deepcluster"))
    if protocol == "sela":
        sela = config.eval.get("sela")
        SelaKnnConfig.from_config(sela_probe.knn_fields(sela))
        sela_probe.probes_enabled(sela)
        sela_probe.SelaProbeConfig.from_config(sela)
    if protocol in _POOLED_PROTOCOLS:
        _POOLED_PROTOCOLS[protocol][0](config)
    return protocol


def deepdive_probe_config(config: ml_collections.ConfigDict) -> DeepdiveProbeConfig:
    """The settings of the deep-dive authors' probe (``config.eval.deepdive``; missing fields
    take the authors' values); ConfigError naming a bad or unknown field."""
    fields = config.eval.get("deepdive")
    fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields or {})
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(DeepdiveProbeConfig)})
    if unknown:
        raise ConfigError(f"config.eval.deepdive has unknown fields {unknown}")
    return DeepdiveProbeConfig(**fields)


def sela_probes(config: ml_collections.ConfigDict) -> sela_probe.SelaProbeConfig | None:
    """The settings of SeLa's linear probes when ``eval.protocol="sela"`` and
    ``eval.sela.probes`` turn them on, else None (ConfigError naming a bad field)."""
    if eval_protocol(config) != "sela" or not sela_probe.probes_enabled(config.eval.get("sela")):
        return None
    return sela_probe.SelaProbeConfig.from_config(config.eval.get("sela"))


def swav_probe(config: ml_collections.ConfigDict) -> SwavProbeConfig:
    """The settings of SwAV's linear evaluation (``config.eval.swav``, its ``layer`` "" taken
    from ``config.eval.probe_layer``); ConfigError naming a bad field."""
    return SwavProbeConfig.from_config(config.eval.get("swav"), config.eval.probe_layer)


def openselfsup_probe(config: ml_collections.ConfigDict) -> OpenselfsupProbeConfig:
    """The settings of OpenSelfSup's linear evaluation (``config.eval.openselfsup``, its
    ``layer`` "" taken from ``config.eval.probe_layer``); ConfigError naming a bad field."""
    return OpenselfsupProbeConfig.from_config(
        config.eval.get("openselfsup"), config.eval.probe_layer
    )


# The protocols that train one linear layer on a globally pooled layer (their settings are
# ``evaluation.pooled_probe.PooledProbeConfig``s): name -> (settings reader, whose protocol).
_POOLED_PROTOCOLS = {
    "swav": (swav_probe, "SwAV's"),
    "openselfsup": (openselfsup_probe, "OpenSelfSup's"),
}


def pooled_probe(config: ml_collections.ConfigDict) -> tuple[str, PooledProbeConfig] | None:
    """(``config.eval.protocol``, its settings) when it is a pooled linear protocol ("swav",
    "openselfsup"), else None; ConfigError naming a bad field."""
    protocol = eval_protocol(config)
    if protocol not in _POOLED_PROTOCOLS:
        return None
    return protocol, _POOLED_PROTOCOLS[protocol][0](config)


def _check_probe_batches(probe, prefix: str, mesh: Mesh) -> None:
    """An official linear protocol's train and test batches split over the devices.

    Raises:
      ConfigError: naming ``config.<prefix>batch_size`` or ``test_batch_size`` when the device
        count does not divide it.
    """
    devices = mesh.devices.size
    for field in ("batch_size", "test_batch_size"):
        if getattr(probe, field) % devices:
            raise ConfigError(
                f"config.{prefix}{field}={getattr(probe, field)} must be a multiple of the "
                f"{devices} devices"
            )


def _check_deepcluster_protocol(config, outputs: dict, mesh: Mesh) -> None:
    """``eval.protocol="deepcluster"``: its layers are outputs of the model and its batches
    split over the devices.

    Raises:
      ConfigError: naming ``config.eval.protocol`` and the missing outputs (a backbone without
        AlexNet's ``probe1``..``probe5``), or the batch field that the device count does not
        divide.
    """
    probe = DeepclusterProbeConfig.from_config(config.eval.get("deepcluster"))
    missing = [layer for layer in probe.layers if layer not in outputs]
    if missing:
        raise ConfigError(
            f"config.eval.protocol='deepcluster' probes config.eval.deepcluster.layers="
            f"{probe.layers}, but config.model.name={config.model.name!r} has no output "
            f"{', '.join(map(repr, missing))}: DeepCluster's protocol pools conv1..conv5 of its "
            f"AlexNet (model.name='alexnet': probe1..probe5); the model has {sorted(outputs)}"
        )
    _check_probe_batches(probe, "eval.deepcluster.", mesh)


def _check_pooled_protocol(config, outputs: dict, mesh: Mesh) -> None:
    """``eval.protocol="swav"`` or ``"openselfsup"``: its layer is a (B, H, W, C) map or (B, D)
    features of the model, and its batches split over the devices.

    Raises:
      ConfigError: naming ``config.eval.<protocol>.layer`` (or ``eval.probe_layer`` it
        defaults to) when the model has no such output or one of another rank, or the batch
        field that the device count does not divide.
    """
    protocol, probe = pooled_probe(config)
    whose = _POOLED_PROTOCOLS[protocol][1]
    field = f"eval.{protocol}.layer"
    field = field if config.eval.get(protocol, {}).get("layer") else "eval.probe_layer"
    shape = outputs[probe.layer].shape if probe.layer in outputs else None
    if shape is None or len(shape) not in (2, 4):
        found = "no such output" if shape is None else f"a {len(shape)}-d output {tuple(shape)}"
        raise ConfigError(
            f"config.eval.protocol={protocol!r} probes config.{field}={probe.layer!r}, but "
            f"config.model.name={config.model.name!r} has {found}: {whose} protocol pools a "
            f"(B, H, W, C) map or takes (B, D) features (resnet: 'pooled', 'stage4'); the model "
            f"has {sorted(outputs)}"
        )
    _check_probe_batches(probe, f"eval.{protocol}.", mesh)


def _check_sela_probes(config, outputs: dict, mesh: Mesh) -> None:
    """``eval.sela.probes``: its layers are (B, H, W, C) maps of the model that its pools
    leave non-empty, and its batches split over the devices.

    Raises:
      ConfigError: naming ``config.eval.sela.probe_layers`` and the missing or flat outputs (a
        backbone without AlexNet's ``relu1``..``relu5``), ``probe_pools`` for a pool that
        leaves no pixel, or the batch field that the device count does not divide.
    """
    probe = sela_probes(config)
    if probe is None:
        return
    missing = [layer for layer in probe.layers if layer not in outputs]
    flat = [layer for layer in probe.layers if layer in outputs and outputs[layer].ndim != 4]
    if missing or flat:
        raise ConfigError(
            f"config.eval.sela.probes=True probes config.eval.sela.probe_layers={probe.layers}, "
            f"but config.model.name={config.model.name!r} has no (B, H, W, C) output "
            f"{', '.join(map(repr, missing + flat))}: SeLa's probes read conv1..conv5 after their "
            f"ReLU (model.name='alexnet': relu1..relu5); the model has {sorted(outputs)}"
        )
    for layer, pool in zip(probe.layers, probe.pools, strict=True):
        shape = sela_probe.pooled_shape(tuple(outputs[layer].shape[1:]), pool)
        if min(shape[:2]) < 1:
            raise ConfigError(
                f"config.eval.sela.probe_pools: {pool} leaves no pixel of {layer}'s "
                f"{outputs[layer].shape[1]}x{outputs[layer].shape[2]} map"
            )
    _check_probe_batches(probe, "eval.sela.probe_", mesh)


def _model_shapes(config, model, dummy: jax.ShapeDtypeStruct):
    """(abstract variables, abstract outputs) of ``model`` on ``dummy``, traced only.

    Raises:
      ConfigError: naming ``config.model`` and the input size when the backbone cannot take it.
    """
    key = jax.random.PRNGKey(0)
    try:
        variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), key, dummy)
        outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, dummy)
    except (ArithmeticError, TypeError, ValueError) as error:
        kwargs = dict(config.model.get("kwargs", {}))
        raise ConfigError(
            f"config.model.name={config.model.name!r} with config.model.kwargs={kwargs} cannot "
            f"take {dummy.shape[1]}x{dummy.shape[2]}x{dummy.shape[3]} inputs "
            f"(config.input.image_size and the data set's images): {type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}"
        ) from error
    return variables, outputs


def _check_crops(config, model, variables, dummy: jax.ShapeDtypeStruct, crops) -> None:
    """Multi-crop: the model, with the parameters of its input size, must take every crop size.

    Raises:
      ConfigError: naming ``config.input.crops`` and the size a backbone cannot take (one that
        flattens a feature map into a linear layer has parameters for one size only).
    """
    for _, size, _ in crops:
        crop = jax.ShapeDtypeStruct((dummy.shape[0], size, size, dummy.shape[3]), dummy.dtype)
        try:
            jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, crop)
        except Exception as error:  # flax's shape errors are not ValueErrors
            raise ConfigError(
                f"config.input.crops: config.model.name={config.model.name!r} cannot take "
                f"{size}x{size} crops with the parameters of its {dummy.shape[1]}x"
                f"{dummy.shape[2]} inputs; multi-crop needs a backbone that pools globally "
                f"(resnet18, resnet50): {type(error).__name__}"
            ) from error


def _plan(config: ml_collections.ConfigDict) -> _Plan:
    """Every check of the config against the data and the model's shapes, in order: numbers,
    the checkpoints kept and the learning rates, the method's fields, the data, sizes against N,
    the pipeline, the optimizers, the model on the input size, the parameter groups, the
    evaluation protocol and the named layers."""
    check_numbers(config)
    _check_settings(config)
    mesh = make_mesh(config.get("num_devices", 0))
    method = make_method(config)  # checks the method's fields before the data is read
    dataset = sources.load(config.data, int(config.input.image_size))
    num_examples = len(dataset.train_images)
    _check_batch(config, mesh, num_examples)
    check_fields(config, dataset)
    pipeline = make_pipeline(config, dataset.train_images)
    if pipeline.crops and not method.multi_view:
        raise ConfigError(
            f"config.augment='multicrop' is for DeepCluster-v2 (without self-distillation) and "
            f"SeLa; {config.method.name} trains on one view of each image"
        )
    samples_per_epoch = config.method.get("samples_per_epoch", 0) or num_examples
    optimizers = make_optimizers(config, samples_per_epoch // config.batch_size)
    dummy = _dummy_batch(pipeline, dataset.train_images)
    variables, outputs = _model_shapes(config, method.model, dummy)
    _check_crops(config, method.model, variables, dummy, pipeline.crops)
    _check_param_groups(variables)
    cluster_layer = config.method.get("cluster_layer", "features")
    if eval_protocol(config) == "deepcluster":
        _check_deepcluster_protocol(config, outputs, mesh)
    if eval_protocol(config) in _POOLED_PROTOCOLS:
        _check_pooled_protocol(config, outputs, mesh)
    _check_sela_probes(config, outputs, mesh)
    for field, layer in [("method.cluster_layer", cluster_layer), *eval_layers(config)]:
        if layer not in outputs:
            raise ConfigError(
                f"config.{field}={layer!r} is not an output of the model; it has {sorted(outputs)}"
            )
    ctx = Context(
        config=config,
        model=method.model,
        optimizers=optimizers,
        num_examples=num_examples,
        feature_dim=int(np.prod(outputs[cluster_layer].shape[1:])),
        cluster_layer=cluster_layer,
        samples_per_epoch=samples_per_epoch,
        true_labels=dataset.train_labels,
        mesh=mesh,
    )
    return _Plan(mesh, method, dataset, pipeline, ctx, dummy)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks ``config`` against its data and its model's shapes; nothing is allocated,
    compiled or written (the model is traced only).

    Raises:
      UserError: ``ConfigError`` naming the field, its value and what is allowed, or
        ``DataError`` naming the data file.
    """
    plan = _plan(config)
    # The method's own checks that need N and the feature width. build_run makes the state
    # itself, before anything is written, so only this check traces it.
    jax.eval_shape(lambda: plan.method.init_state(plan.ctx))


def build_run(config: ml_collections.ConfigDict) -> Run:
    """Checks the config (``check_config``), then loads the data, places it on the devices and
    initialises model, optimizers and state."""
    plan = _plan(config)
    mesh, method, dataset, ctx = plan.mesh, plan.method, plan.dataset, plan.ctx
    variables = _random_variables(config, method.model, plan.dummy)
    variables = _initial_variables(method, ctx, variables)
    state = _train_state(config, variables, method, ctx)
    sharding = jax.tree.map(lambda _: replicated(mesh), state)
    if method.state_sharding is not None:
        sharding = sharding.replace(method=method.state_sharding(ctx, state.method))
    test_images = dataset.test_images
    return Run(
        config=config,
        mesh=mesh,
        dataset=dataset,
        pipeline=plan.pipeline,
        method=method,
        ctx=ctx,
        train_images=place_bank(dataset.train_images, mesh),
        test_images=None if test_images is None else place_bank(test_images, mesh),
        state_sharding=sharding,
        initial_state=jax.device_put(state, sharding),
    )
