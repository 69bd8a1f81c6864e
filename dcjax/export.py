"""Use a trained run elsewhere: ``dcjax.load(workdir)`` and ``python -m dcjax.export``.

    import dcjax
    run = dcjax.load("runs/sela-digits")
    features = run.embed(my_images)          # (N, H, W, C) uint8 -> (N, D) float32

Command line (``--what``):
  features  ``--split=train|test``, ``--layer=NAME`` (default ``eval.knn_layer``): an ``.npz`` with
            ``features`` (N, ...), ``labels`` (the true labels, when known) and ``paths`` (the
            source file of each example, for image folders).
  labels    the latest pseudo-labels: ``labels`` (H, N), one row per head, with ``paths``.
  model     the trained trunk: a ``.msgpack`` of ``{"config", "params", "batch_stats"}``
            (``flax.serialization``), read back with ``load_trunk``.

  python -m dcjax.export --workdir=runs/sela-digits --what=features --split=test --out=f.npz
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import app, flags

from dcjax.core import cli
from dcjax.core.errors import ConfigError, UserError

__all__ = ["TrainedRun", "load", "load_trunk"]

_WHAT = ("features", "labels", "model")


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A trained run, restored from its workdir.

    Attributes:
      config: the run's config (``config.json``).
      model: the Flax module; ``model.apply(variables, x, train=False)`` gives its named outputs.
      variables: ``{"params": ..., "batch_stats": ...}`` of the latest checkpoint.
      run: the rebuilt run (data, pipeline, mesh), for the evaluation tools.
      state: the restored training state.
    """

    config: object
    model: object
    variables: dict
    run: object
    state: object

    @property
    def layers(self) -> list[str]:
        """The named outputs ``embed`` can return."""
        import jax
        import jax.numpy as jnp

        images = self.run.dataset.train_images[:1]
        dummy = jnp.zeros((1, *self.run.pipeline.input_shape(images.shape[1:])), jnp.float32)
        shapes = jax.eval_shape(lambda v: self.model.apply(v, dummy, train=False), self.variables)
        return sorted(shapes)

    def embed(self, images: np.ndarray, layer: str | None = None, batch_size: int = 256):
        """(N, H, W, C) uint8 images -> (N, ...) float32 features of ``layer`` (default the
        run's ``eval.knn_layer``), through the run's evaluation view (resize, normalisation).

        Raises:
          ValueError: naming the images' shape when they are not (N, H, W, C) uint8 with the
            training images' channel count, or naming ``layer`` when the model has no such output.
        """
        from dcjax.core.distributed import to_host
        from dcjax.data.bank import place_bank
        from dcjax.training.step import extract_features, make_feature_fn

        images = np.asarray(images)
        channels = self.run.dataset.train_images.shape[-1]
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != channels:
            raise ValueError(
                f"images must be (N, H, W, {channels}) uint8, got {images.shape} {images.dtype}"
            )
        layer = layer or self.config.eval.knn_layer
        if layer not in self.layers:
            raise ValueError(f"layer={layer!r} is not an output of the model: {self.layers}")
        mesh = self.run.mesh
        batch = max(mesh.devices.size, batch_size - batch_size % mesh.devices.size)
        fn = make_feature_fn(self.model, self.run.pipeline, [layer], mesh)
        feats = extract_features(fn, self.state, place_bank(images, mesh), batch)
        return to_host(feats[layer])


def load(workdir: str) -> TrainedRun:
    """The run saved in ``workdir`` (its config, data pipeline and latest checkpoint).

    Raises:
      UserError: ``workdir`` has no config.json or no checkpoint.
    """
    import ml_collections

    from dcjax.training import checkpoint
    from dcjax.training.setup import build_run

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"--workdir={workdir} has no config.json: is it a dcjax run?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    built = build_run(config)
    manager = checkpoint.make_manager(workdir, config.checkpoint.keep)
    state = checkpoint.restore_latest(manager, built.initial_state)
    if state is None:
        raise UserError(f"--workdir={workdir} has no checkpoint yet")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return TrainedRun(config, built.ctx.model, variables, built, state)


def load_trunk(path: str) -> dict:
    """A ``--what=model`` export: ``{"config": dict, "params": ..., "batch_stats": ...}``."""
    from flax import serialization

    with open(path, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
    return {**tree, "config": json.loads(tree["config"])}


def export(trained: TrainedRun, what: str, out: str, split: str = "train", layer: str = ""):
    """Writes ``what`` (features, labels or model) of ``trained`` to ``out``; returns ``out``.

    Raises:
      ValueError: naming ``--what`` or ``--split`` when unknown or when the run has no test
        split.
    """
    from dcjax.core.distributed import to_host

    data = trained.run.dataset
    if what not in _WHAT:
        raise ConfigError(f"--what={what!r} must be one of {_WHAT}")
    if split not in ("train", "test"):
        raise ConfigError(f"--split={split!r} must be train or test")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if what == "model":
        import jax
        from flax import serialization

        tree = {
            "config": trained.config.to_json_best_effort(),
            "params": jax.tree.map(to_host, trained.variables["params"]["trunk"]),
            "batch_stats": jax.tree.map(to_host, trained.variables["batch_stats"].get("trunk", {})),
        }
        with open(out, "wb") as f:
            f.write(serialization.msgpack_serialize(tree))
        return out
    images = getattr(data, f"{split}_images")
    if images is None:
        raise ConfigError(f"--split={split}: the run's data ({data.name}) has no {split} split")
    extra = {}
    paths = getattr(data, f"{split}_paths")
    if paths is not None:
        extra["paths"] = paths
    if what == "labels":
        if split != "train":
            raise ConfigError("--what=labels: pseudo-labels exist for the train split only")
        from dcjax.data.label_export import method_labels

        labels = method_labels(trained.state.method)
        np.savez(out, labels=labels, cycle=np.int32(int(trained.state.cycle)), **extra)
        return out
    true_labels = getattr(data, f"{split}_labels")
    if true_labels is not None:
        extra["labels"] = true_labels
    features = trained.embed(images, layer or None, trained.config.eval_batch_size)
    np.savez(out, features=features, layer=layer or trained.config.eval.knn_layer, **extra)
    return out


_FLAGS = None


def _define_flags():
    global _FLAGS
    _FLAGS = dict(
        workdir=flags.DEFINE_string("workdir", None, "Run directory written by dcjax.main."),
        what=flags.DEFINE_enum("what", "features", list(_WHAT), "What to export."),
        split=flags.DEFINE_enum("split", "train", ["train", "test"], "Which split (features)."),
        layer=flags.DEFINE_string("layer", "", "Model output (features); default eval.knn_layer."),
        out=flags.DEFINE_string("out", None, "Output file (.npz; .msgpack for the model)."),
    )
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {name: flag.value for name, flag in _FLAGS.items()}
    trained = load(values["workdir"])
    path = export(trained, values["what"], values["out"], values["split"], values["layer"])
    print(f"Wrote {values['what']} of {values['workdir']} to {path}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
