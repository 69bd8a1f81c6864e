"""Train-step throughput and one DeepCluster cycle, dcjax against eager PyTorch, in one process.

  pip install -e '.[bench]'                                   # torch==2.13.0 (CPU build)
  python bench/train_speed.py --quick --out=/tmp/ts.json      # tiny sizes: checks the script
  python bench/train_speed.py                                 # every case at full size
  python bench/train_speed.py --cases=lenet5,dc_cycle --repeats=5 --steps_per_call=50
  python bench/train_speed.py --cases=dc_cycle --fmnist_dir=/usr/share/datasets/fashion-mnist

Cases:

  lenet5        ``configs/deepcluster.py:fmnist``: LeNet-5 + BN, (28, 28, 1) zero-padded to 32,
                K=5 head on the 84-d features, batch 128, SGD lr 0.1 momentum 0.1 wd 1e-3, flip.
  mini_alexnet  ``configs/deepcluster.py:cifar10``: mini-AlexNet + Sobel, (32, 32, 3), K=1000,
                batch 64, dropout 0.5, SGD lr 0.1 momentum 0.9 wd 1e-3; ``augment="flip"``
                instead of the variant's crop_flip, so both sides do the same input work.
  resnet18      the same run with ``model.name="resnet18"``, ``kwargs={"cifar_stem": True,
                "width": --resnet_width}`` (3x3 stride-1 stem, no max-pool), Sobel kept (the
                variant's front end, 2 input channels), K=1000 head on the 512-d pooled
                features, batch 64, flip.
  resnet18_kd   ``configs/deepcluster_v2_kd.py:cifar10`` (``bench/kd_step.py``'s step), batch 64,
                no augmentation (the config's).
  dc_cycle      one DeepCluster Fashion-MNIST cycle (``configs/deepcluster.py:fmnist``), N =
                60,000 random (28, 28, 1) images, or the real IDX files with ``--fmnist_dir``.

Each train-step case runs dcjax's real step (``dcjax.training.step``: batch gathered from the
uint8 ``ImageBank`` on the device, /255, flip, normalise, forward, loss, backward, SGD with
momentum and coupled weight decay, the head group with the config's head momentum) beside the same
step in eager PyTorch (``bench/torch_peers.py``): the batch gathered by index from a uint8 tensor
bank, /255, random horizontal flip, per-channel normalise (dcjax's statistics), forward in train
mode (batch statistics, dropout), the same loss, backward, ``torch.optim.SGD(momentum,
weight_decay)`` with the same two parameter groups. The KD case's PyTorch learning rate is the
config's peak (dcjax follows its warm-up schedule); the rate does not change the speed. Both sides
read a bank of ``--bank_size`` random uint8 images (an npz, ``data.source="npz"``, 1 device) with
the same random (S, B) index block.

Timing: the first calls are reported apart (``first_*_s``: the scan call of S steps and one
single-step call, compile included). Then ``--repeats`` rounds, each one dcjax ``make_train_steps``
call of S = ``--steps_per_call`` steps (``lax.scan``), S dcjax ``make_train_step`` calls, and S
PyTorch steps, alternating within the round so background load falls on all three alike; the best
round of each counts. images/s = B * S / seconds. **ratio = dcjax images/s / PyTorch images/s:
above 1 means dcjax is faster** (``ratio`` for the scan, ``ratio_single`` for single steps).

The cycle, dcjax: the feature pass (``extract_features`` with ``eval_batch_size`` 512, the
``features`` layer), the clustering (``method.recluster``: L2 normalisation, ``kmeans.fit`` K=5,
20 Lloyd iterations, random init, label statistics, a fresh head; the two halves of
``training.loop.recluster_phase`` timed apart) and one epoch of ceil(N / 128) = 469 steps as one
``make_train_steps`` call (compiled ahead, ``dcjax_epoch_compile_s``), on a random order of the
examples (wrapped to whole batches; dcjax's own loop drops the last partial batch and samples
uniformly over the clusters). PyTorch + scikit-learn: the same LeNet's feature pass in eval mode
in batches of 512, L2 normalisation, ``sklearn.cluster.KMeans(n_clusters=5, n_init=1, max_iter=20,
algorithm="lloyd", init="random", tol=0)`` (exactly 20 iterations from random points, as dcjax),
the head re-initialised, then 469 eager training steps. One warm-up of each part first (dcjax
compiles), then ``--repeats`` rounds alternating dcjax and PyTorch; per part the best round, for
the whole cycle the best round's sum. The line under the table gives ``dcjax's whole cycle /
PyTorch's bare training epoch``.

PyTorch runs at ``torch.set_num_threads(os.cpu_count())``. ``--omp_wait_policy=PASSIVE`` (set
before torch loads) stops its OpenMP threads spinning at barriers: slower on an idle machine, but
with another job on one of two cores the spinning made PyTorch's mini-AlexNet step 1.2 s at 2
threads against 0.07 s at 1.

On a GPU (``jax.default_backend() == "gpu"`` and ``torch.cuda.is_available()``) PyTorch runs on
CUDA (timed with ``torch.cuda.synchronize``); k-means in scikit-learn stays on the CPU.

Results: ``--out`` (default ``bench/results/train_speed-<machine>.json``) with the machine (CPU
model, cores, load average at start and end, versions, backend, dcjax commit), and a Markdown table
beside it. On a shared machine the load averages say how far to trust the figures.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from bench_common import cpu_model, git_commit, load_averages

if TYPE_CHECKING:  # torch and dcjax (scikit-learn) load OpenMP: the code imports them in the
    import torch  # functions, after main() has set --omp_wait_policy's OMP_WAIT_POLICY.

    from dcjax.training.setup import Run
    from dcjax.training.state import TrainState

STEP_CASES = ("lenet5", "mini_alexnet", "resnet18", "resnet18_kd")
CASES = (*STEP_CASES, "dc_cycle")
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_ENV_KEYS = ("XLA_FLAGS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")

_CASES = flags.DEFINE_list("cases", list(CASES), f"Cases among {list(CASES)}.")
_QUICK = flags.DEFINE_bool(
    "quick",
    False,
    "Tiny sizes that check the script: 3-step rounds, 1 repeat, N=2,048 for the cycle, "
    "ResNet-18 at width 8.",
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per case; the best counts.")
_STEPS = flags.DEFINE_integer("steps_per_call", 20, "S: steps per round (per scan call).")
_BANK = flags.DEFINE_integer("bank_size", 2048, "Random images in the train-step cases' bank.")
_WIDTH = flags.DEFINE_integer("resnet_width", 64, "ResNet-18 stage-1 width (64: the paper's).")
_CYCLE_N = flags.DEFINE_integer("cycle_examples", 60_000, "Images of the DeepCluster cycle.")
_FMNIST_DIR = flags.DEFINE_string(
    "fmnist_dir", "", "Cycle on these Fashion-MNIST IDX files (source 'idx'); '' = random images."
)
_OMP_WAIT = flags.DEFINE_string(
    "omp_wait_policy",
    "",
    "OMP_WAIT_POLICY for PyTorch's (and scikit-learn's) OpenMP threads, set before torch loads; "
    "'' = the library default (threads spin briefly at barriers: fastest on an idle machine).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the index blocks and the models.")
_OUT = flags.DEFINE_string(
    "out", "", "JSON results (+ .md beside); '' = bench/results/train_speed-<machine>.json."
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sizes every case reads (``--quick`` shrinks them)."""

    repeats: int
    steps: int
    bank_size: int
    resnet_width: int
    cycle_examples: int
    fmnist_dir: str
    seed: int

    @classmethod
    def from_flags(cls) -> Settings:
        quick = _QUICK.value
        return cls(
            repeats=1 if quick else _REPEATS.value,
            steps=3 if quick else _STEPS.value,
            bank_size=_BANK.value,
            resnet_width=min(_WIDTH.value, 8) if quick else _WIDTH.value,
            cycle_examples=2048 if quick else _CYCLE_N.value,
            fmnist_dir=_FMNIST_DIR.value,
            seed=_SEED.value,
        )


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Configs and data.


def case_config(case: str, resnet_width: int) -> ml_collections.ConfigDict:
    """The dcjax config of a train-step case (data source still to set), 1 device."""
    from dcjax.config_base import load_config

    if case == "lenet5":
        config = load_config("deepcluster", "fmnist")
    elif case in ("mini_alexnet", "resnet18"):
        config = load_config("deepcluster", "cifar10")
        config.augment = "flip"  # not crop_flip: the PyTorch side flips only
        if case == "resnet18":
            config.model.update(name="resnet18", kwargs={"cifar_stem": True, "width": resnet_width})
    elif case == "resnet18_kd":
        config = load_config("deepcluster_v2_kd", "cifar10")
        config.model.kwargs = {**config.model.kwargs, "width": resnet_width}
        config.batch_size = 64
    else:
        raise ValueError(f"unknown train-step case {case!r}; choose among {STEP_CASES}")
    config.num_devices = 1
    return config


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the run's images: Fashion-MNIST's for LeNet-5, CIFAR's otherwise."""
    return (28, 28, 1) if config.model.name == "lenet5" else (32, 32, 3)


def write_npz(images: np.ndarray, directory: str) -> str:
    """``images`` as an npz with the key ``train_images`` (dcjax's ``npz`` source)."""
    path = os.path.join(directory, f"images-{'x'.join(map(str, images.shape))}.npz")
    np.savez(path, train_images=images)
    return path


def random_images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# dcjax.


def _copy_state(run: Run) -> TrainState:
    """A copy of the run's initial state (the steps donate their input)."""
    return jax.tree.map(lambda x: x.copy(), run.initial_state)


def _step_args(run: Run) -> tuple:
    return (
        run.ctx.model,
        run.ctx.optimizers,
        run.method,
        run.pipeline,
        run.mesh,
        run.state_sharding,
    )


def num_classes(config: ml_collections.ConfigDict) -> int:
    """K of the head: DeepCluster's clusters, or DeepCluster-v2's (single) prototype set."""
    method = config.method
    if method.name == "deepcluster":
        return int(method.num_clusters)
    if len(method.num_prototypes) != 1:
        raise ValueError("the benchmark supports one prototype set")
    return int(method.num_prototypes[0])


def with_labels(run: Run, state: TrainState, labels: np.ndarray) -> TrainState:
    """``state`` with the method's pseudo-labels set to ``labels`` (N,), in the run's sharding."""
    method = state.method
    fields = {f.name for f in dataclasses.fields(method)}
    if "labels" in fields:  # DeepCluster-v2: (S, N), one row per prototype set
        method = method.replace(labels=jnp.asarray(labels)[None])
    else:
        method = method.replace(pseudo_labels=jnp.asarray(labels))
    return jax.device_put(state.replace(method=method), run.state_sharding)


class DcjaxSteps:
    """dcjax's train step on one run: S steps as one scan call, or S single-step calls."""

    def __init__(
        self, config: ml_collections.ConfigDict, block: np.ndarray, labels: np.ndarray
    ) -> None:
        from dcjax.core.mesh import replicated
        from dcjax.training.setup import build_run
        from dcjax.training.step import make_train_step, make_train_steps

        self.run = build_run(config)
        self.steps_fn = make_train_steps(*_step_args(self.run))
        self.step_fn = make_train_step(*_step_args(self.run))
        self.state = with_labels(self.run, _copy_state(self.run), labels)
        self.block = jax.device_put(block, replicated(self.run.mesh))
        self.rows = [jax.device_put(row, replicated(self.run.mesh)) for row in block]
        self.last_loss = float("nan")

    def scan_round(self) -> float:
        """Seconds of one ``make_train_steps`` call over the (S, B) block."""
        start = time.perf_counter()
        self.state, metrics = self.steps_fn(self.state, self.run.train_images, self.block)
        jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - start
        self.last_loss = float(metrics["loss"][-1])
        return seconds

    def single_round(self, rows: int | None = None) -> float:
        """Seconds of ``rows`` (default S) ``make_train_step`` calls, one per block row."""
        start = time.perf_counter()
        for row in self.rows[:rows]:
            self.state, metrics = self.step_fn(self.state, self.run.train_images, row)
        jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - start
        self.last_loss = float(metrics["loss"])
        return seconds


# --------------------------------------------------------------------------------------------
# PyTorch.


@functools.cache
def torch_device() -> str:
    """CUDA when JAX runs on a GPU and torch sees one, else the CPU (all cores)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _sync() -> None:
    if torch_device() == "cuda":
        import torch

        torch.cuda.synchronize()


def torch_peer(
    config: ml_collections.ConfigDict, in_channels: int
) -> tuple[torch.nn.Module, Callable[[Any, torch.Tensor], torch.Tensor]]:
    """(network, loss(outputs, labels)) mirroring the dcjax config's model and method."""
    import torch.nn.functional as F
    import torch_peers as tp

    method, kwargs, k = config.method, dict(config.model.kwargs), num_classes(config)
    if config.model.name == "resnet18":
        extra = set(kwargs) - {"cifar_stem", "width", "num_branches"}
        if not kwargs.get("cifar_stem") or extra:
            raise ValueError(f"the PyTorch ResNet-18 has the CIFAR stem only; kwargs {kwargs}")
    if method.get("self_distillation", False):
        if config.model.sobel or kwargs.get("num_branches") != 3:
            raise ValueError("the PyTorch KD peer is a 3-branch ResNet-18 without Sobel")
        net = tp.KDNet(kwargs["width"], k, method.feat_dim, method.hidden_dim, in_channels)
        loss = functools.partial(
            tp.kd_loss,
            temperature=method.temperature,
            alpha=method.distill_alpha,
            hint_weight=method.hint_weight,
        )
        return net, loss
    if method.name != "deepcluster":
        raise ValueError(f"no PyTorch peer for method {method.name!r}")
    channels = 2 if config.model.sobel else in_channels
    trunks = {
        "lenet5": lambda: tp.LeNet5(channels),
        "mini_alexnet": lambda: tp.MiniAlexNet(channels, kwargs.get("dropout_rate", 0.5)),
        "resnet18": lambda: tp.ResNet18(kwargs.get("width", 64), channels),
    }
    net = tp.DeepClusterNet(trunks[config.model.name](), k, bool(config.model.sobel))
    return net, F.cross_entropy


class TorchSteps:
    """The PyTorch peer's eager train step over a uint8 bank (N, C, H, W) on its device."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        images: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        labels: np.ndarray | None = None,
    ) -> None:
        import torch
        import torch_peers as tp

        torch.manual_seed(seed)
        device = torch_device()
        self.net, self.loss_fn = torch_peer(config, images.shape[-1])
        self.net.to(device)
        optim = config.optim
        self.opt = tp.sgd(
            self.net,
            lr=optim.learning_rate,
            momentum=optim.momentum,
            head_momentum=optim.get("head_momentum", 0.0),
            weight_decay=optim.weight_decay,
        )
        self.flip = config.augment != "none"
        if config.augment not in ("none", "flip"):
            raise ValueError(f"the PyTorch peer flips only; config.augment={config.augment!r}")
        self.bank = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.bank = self.bank.to(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        labels = np.zeros(len(images), np.int64) if labels is None else labels
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
        self.device = device
        self.last_loss = float("nan")

    def inputs(self, idx: torch.Tensor | slice, train: bool) -> torch.Tensor:
        """Gathered batch -> /255 -> (train: random horizontal flip) -> normalised floats."""
        import torch

        x = self.bank[idx].float().div_(255.0)
        if train and self.flip:
            mirror = torch.rand(x.shape[0], device=self.device) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        return (x - self.mean) / self.std

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(self.net(self.inputs(idx, train=True)), self.labels[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def round(self, block: np.ndarray) -> float:
        """Seconds of one eager train step per row of the (S, B) block, train mode."""
        import torch

        rows = torch.from_numpy(block.astype(np.int64)).to(self.device)
        self.net.train()
        _sync()
        start = time.perf_counter()
        for row in rows:
            loss = self.step(row)
        _sync()
        seconds = time.perf_counter() - start
        self.last_loss = float(loss.detach())
        return seconds


# --------------------------------------------------------------------------------------------
# Train-step cases.


def step_case(case: str, settings: Settings, workdir: str) -> dict:
    """Images/s of dcjax (scan and single step) and PyTorch on one network."""
    config = case_config(case, settings.resnet_width)
    rng = np.random.default_rng(settings.seed)
    images = random_images(rng, settings.bank_size, image_shape(config))
    config.data.update(source="npz", path=write_npz(images, workdir))
    batch, steps = config.batch_size, settings.steps
    block = rng.integers(0, len(images), (steps, batch), dtype=np.int32)
    labels = rng.integers(0, num_classes(config), len(images), dtype=np.int32)
    dcjax = DcjaxSteps(config, block, labels)
    first_scan = dcjax.scan_round()  # compile + S steps
    first_single = dcjax.single_round(rows=1)  # compile + 1 step
    pipeline = dcjax.run.pipeline
    peer = TorchSteps(config, images, pipeline.mean, pipeline.std, settings.seed, labels)
    first_torch = peer.round(block[:1])
    times: dict[str, list[float]] = {"scan": [], "single": [], "torch": []}
    for _ in range(settings.repeats):
        times["scan"].append(dcjax.scan_round())
        times["single"].append(dcjax.single_round())
        times["torch"].append(peer.round(block))
    rate = {name: batch * steps / min(seconds) for name, seconds in times.items()}
    row = {
        "case": case,
        "model": config.model.name,
        "model_kwargs": dict(config.model.kwargs),
        "sobel": bool(config.model.sobel),
        "method": config.method.name,
        "batch": batch,
        "augment": config.augment,
        "steps_per_call": steps,
        "dcjax_images_per_s": round(rate["scan"], 1),
        "dcjax_single_step_images_per_s": round(rate["single"], 1),
        "torch_images_per_s": round(rate["torch"], 1),
        "ratio": round(rate["scan"] / rate["torch"], 3),
        "ratio_single": round(rate["single"] / rate["torch"], 3),
        "first_scan_call_s": round(first_scan, 2),
        "first_single_call_s": round(first_single, 2),
        "first_torch_step_s": round(first_torch, 3),
        "round_s": {name: [round(s, 4) for s in seconds] for name, seconds in times.items()},
        "last_loss": {"dcjax": dcjax.last_loss, "torch": peer.last_loss},
    }
    if not all(np.isfinite(v) for v in row["last_loss"].values()):
        raise FloatingPointError(f"{case}: non-finite loss {row['last_loss']}")
    return row


# --------------------------------------------------------------------------------------------
# The DeepCluster Fashion-MNIST cycle.


def cycle_config(settings: Settings, workdir: str) -> ml_collections.ConfigDict:
    """``configs/deepcluster.py:fmnist`` on the real IDX files or on random images, 1 device."""
    from dcjax.config_base import load_config

    config = load_config("deepcluster", "fmnist")
    config.num_devices = 1
    n = settings.cycle_examples
    if settings.fmnist_dir:
        config.data.update(source="idx", path=settings.fmnist_dir, max_train_examples=n)
    else:
        rng = np.random.default_rng(settings.seed + 1)
        path = write_npz(random_images(rng, n, (28, 28, 1)), workdir)
        config.data.update(source="npz", path=path)
    return config


def epoch_order(rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
    """(ceil(n / batch), batch) int32: a random order of the n examples, wrapped around."""
    steps = -(-n // batch)
    return np.resize(rng.permutation(n).astype(np.int32), steps * batch).reshape(steps, batch)


class DcjaxCycle:
    """Feature pass, clustering and one epoch of ``configs/deepcluster.py:fmnist`` in dcjax."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        from dcjax.training.setup import build_run
        from dcjax.training.step import make_feature_fn

        self.run = build_run(config)
        run = self.run
        self.feature_fn = make_feature_fn(
            run.ctx.model, run.pipeline, [run.ctx.cluster_layer], run.mesh
        )
        self.state = _copy_state(run)
        self.epoch_fn = None
        self.stats: dict[str, float] = {}
        self.last_loss = float("nan")

    def compile_epoch(self, order: np.ndarray) -> float:
        """Compiles the (steps, B) epoch call ahead of time; returns the seconds it took."""
        from dcjax.training.step import make_train_steps

        start = time.perf_counter()
        steps_fn = make_train_steps(*_step_args(self.run))
        self.epoch_fn = steps_fn.lower(self.state, self.run.train_images, order).compile()
        return time.perf_counter() - start

    def features(self) -> jax.Array:
        from dcjax.training.step import extract_features

        config = self.run.config
        return extract_features(
            self.feature_fn, self.state, self.run.train_images, config.eval_batch_size
        )[self.run.ctx.cluster_layer]

    def recluster(self, features: jax.Array) -> None:
        """``recluster_phase``'s second half: k-means, new labels and head, state replicated."""
        state, self.stats = self.run.method.recluster(self.run.ctx, self.state, features)
        self.state = jax.block_until_ready(jax.device_put(state, self.run.state_sharding))

    def epoch(self, order: np.ndarray) -> None:
        self.state, metrics = self.epoch_fn(self.state, self.run.train_images, order)
        self.last_loss = float(jax.block_until_ready(metrics["loss"])[-1])

    def cycle(self, order: np.ndarray) -> dict[str, float]:
        """Seconds of each part."""
        start = time.perf_counter()
        features = jax.block_until_ready(self.features())
        after_features = time.perf_counter()
        self.recluster(features)
        after_clustering = time.perf_counter()
        self.epoch(order)
        end = time.perf_counter()
        return {
            "features_s": after_features - start,
            "clustering_s": after_clustering - after_features,
            "epoch_s": end - after_clustering,
        }


class TorchCycle:
    """The same cycle with the PyTorch LeNet-5 and scikit-learn's k-means."""

    def __init__(self, config: ml_collections.ConfigDict, run: Run, seed: int) -> None:
        self.steps = TorchSteps(
            config, run.dataset.train_images, run.pipeline.mean, run.pipeline.std, seed
        )
        self.eval_batch = config.eval_batch_size
        self.num_clusters = int(config.method.num_clusters)
        self.kmeans_iters = int(config.method.kmeans.num_iters)
        self.seed = seed

    def features(self) -> np.ndarray:
        """(N, 84) float32 features, eval mode, no augmentation, batches of ``eval_batch``."""
        import torch

        net, bank = self.steps.net, self.steps.bank
        net.eval()
        with torch.no_grad():
            chunks = [
                net.features(self.steps.inputs(slice(i, i + self.eval_batch), train=False))
                for i in range(0, len(bank), self.eval_batch)
            ]
        return torch.cat(chunks).cpu().numpy()

    def recluster(self, features: np.ndarray) -> None:
        """L2 normalisation, k-means labels, a fresh head (its optimizer state dropped)."""
        import torch
        from sklearn.cluster import KMeans

        x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        kmeans = KMeans(
            n_clusters=self.num_clusters,
            n_init=1,
            max_iter=self.kmeans_iters,
            algorithm="lloyd",
            init="random",
            tol=0.0,
            random_state=self.seed,
        ).fit(x)
        self.kmeans_iterations = int(kmeans.n_iter_)
        self.steps.labels = torch.from_numpy(kmeans.labels_.astype(np.int64)).to(self.steps.device)
        self.steps.net.reset_head()
        for p in self.steps.net.head.parameters():
            self.steps.opt.state.pop(p, None)

    def cycle(self, order: np.ndarray) -> dict[str, float]:
        """Seconds of each part."""
        start = time.perf_counter()
        features = self.features()
        after_features = time.perf_counter()
        self.recluster(features)
        after_clustering = time.perf_counter()
        epoch_s = self.steps.round(order)
        return {
            "features_s": after_features - start,
            "clustering_s": after_clustering - after_features,
            "epoch_s": epoch_s,
        }


def cycle_case(settings: Settings, workdir: str) -> dict:
    """The cycle's parts, dcjax and PyTorch + scikit-learn, best of ``repeats`` rounds each."""
    config = cycle_config(settings, workdir)
    rng = np.random.default_rng(settings.seed + 2)
    dcjax = DcjaxCycle(config)
    n, batch = len(dcjax.run.train_images), config.batch_size
    order = epoch_order(rng, n, batch)
    compile_s = dcjax.compile_epoch(order)
    start = time.perf_counter()
    dcjax.recluster(jax.block_until_ready(dcjax.features()))  # compiles the pass and k-means
    first_recluster = time.perf_counter() - start
    peer = TorchCycle(config, dcjax.run, settings.seed)
    peer.recluster(peer.features())
    peer.steps.round(order[:1])
    rounds: dict[str, list[dict[str, float]]] = {"dcjax": [], "torch": []}
    for _ in range(settings.repeats):
        rounds["dcjax"].append(dcjax.cycle(epoch_order(rng, n, batch)))
        rounds["torch"].append(peer.cycle(epoch_order(rng, n, batch)))
    best = {
        side: {part: min(r[part] for r in runs) for part in runs[0]}
        for side, runs in rounds.items()
    }
    for side, runs in rounds.items():
        best[side]["total_s"] = min(sum(r.values()) for r in runs)
    return {
        "case": "dc_cycle",
        "data": config.data.source + (f":{config.data.path}" if settings.fmnist_dir else ""),
        "n": n,
        "batch": batch,
        "epoch_steps": int(order.shape[0]),
        "num_clusters": int(config.method.num_clusters),
        "kmeans_iters": int(config.method.kmeans.num_iters),
        "torch_kmeans_iterations": peer.kmeans_iterations,
        "dcjax_epoch_compile_s": round(compile_s, 2),
        "dcjax_first_recluster_s": round(first_recluster, 2),
        "dcjax": {k: round(v, 3) for k, v in best["dcjax"].items()},
        "torch": {k: round(v, 3) for k, v in best["torch"].items()},
        "dcjax_cycle_over_torch_epoch": round(
            best["dcjax"]["total_s"] / best["torch"]["epoch_s"], 3
        ),
        "dcjax_cycle_over_torch_cycle": round(
            best["dcjax"]["total_s"] / best["torch"]["total_s"], 3
        ),
        "rounds": {
            s: [{k: round(v, 3) for k, v in r.items()} for r in rs] for s, rs in rounds.items()
        },
        "last_loss": {"dcjax": dcjax.last_loss, "torch": peer.steps.last_loss},
    }


# --------------------------------------------------------------------------------------------
# Report.


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


def machine_info() -> dict:
    """CPU, cores, backend and versions (the load averages are added by ``main``)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "jax_devices": [d.device_kind for d in jax.devices()],
        "torch_device": torch_device(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {
            m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "sklearn")
        },
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
        "dcjax_commit": git_commit(),
    }


def default_out(quick: bool) -> str:
    """bench/results/train_speed-<cpu>-<n>cpu[-<accelerator>][-quick].json."""
    parts = [cpu_model(), f"{os.cpu_count()}cpu"]
    if jax.default_backend() != "cpu":
        parts.append(jax.devices()[0].device_kind)
    if quick:
        parts.append("quick")
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return os.path.join(_BENCH_DIR, "results", f"train_speed-{slug}.json")


def markdown(report: dict) -> str:
    """The results as two Markdown tables (train steps, cycle) under a header line."""
    m, st = report["machine"], report["settings"]
    load, load_end = load_averages(m)
    lines = [
        f"dcjax vs eager PyTorch ({m['torch_device']}), {m['cpu_model']}, {m['cpu_count']} "
        f"cores, JAX {m['versions']['jax']} ({m['backend']}), PyTorch {m['versions']['torch']}, "
        f"scikit-learn {m['versions']['sklearn']}; load average at start {load}, at end "
        f"{load_end}; best of {st['repeats']} rounds; {m['date']}; commit {m['dcjax_commit']}.",
        "",
    ]
    steps = report["train_steps"]
    if steps:
        lines += [
            f"Train step, S = {st['steps']} steps per round (ratio = dcjax / PyTorch images/s, "
            "above 1: dcjax faster):",
            "",
            "| network | batch | augment | dcjax images/s (scan) | dcjax images/s (single "
            "step) | PyTorch images/s | ratio | ratio (single) | dcjax first calls s "
            "(scan, single) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in steps:
            name = r["case"] + (
                f" (width {r['model_kwargs']['width']})" if "resnet" in r["case"] else ""
            )
            lines.append(
                f"| {name} | {r['batch']} | {r['augment']} | {r['dcjax_images_per_s']} | "
                f"{r['dcjax_single_step_images_per_s']} | {r['torch_images_per_s']} | "
                f"{r['ratio']} | {r['ratio_single']} | {r['first_scan_call_s']}, "
                f"{r['first_single_call_s']} |"
            )
        lines.append("")
    c = report["cycle"]
    if c:
        lines += [
            f"DeepCluster Fashion-MNIST cycle: N = {c['n']:,} ({c['data']}), LeNet-5, K = "
            f"{c['num_clusters']}, {c['kmeans_iters']} k-means iterations, one epoch of "
            f"{c['epoch_steps']} steps of {c['batch']} (dcjax epoch compiled ahead in "
            f"{c['dcjax_epoch_compile_s']} s; first feature pass + clustering "
            f"{c['dcjax_first_recluster_s']} s):",
            "",
            "| part | dcjax s | PyTorch + scikit-learn s | dcjax / peer |",
            "| --- | --- | --- | --- |",
        ]
        for part, label in (
            ("features_s", "feature pass"),
            ("clustering_s", "clustering"),
            ("epoch_s", "training epoch"),
            ("total_s", "whole cycle"),
        ):
            a, b = c["dcjax"][part], c["torch"][part]
            lines.append(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.3f} |")
        lines += [
            "",
            f"dcjax's whole cycle / PyTorch's bare training epoch: "
            f"**{c['dcjax_cycle_over_torch_epoch']}**.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    unknown = [c for c in _CASES.value if c not in CASES]
    if unknown:
        raise app.UsageError(f"--cases: unknown {unknown}; choose among {list(CASES)}")
    settings = Settings.from_flags()
    if _OMP_WAIT.value:  # read by libgomp when torch first loads it (below, not at import)
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported before OMP_WAIT_POLICY could be set")
        os.environ["OMP_WAIT_POLICY"] = _OMP_WAIT.value
    load_start = os.getloadavg()
    wall = time.perf_counter()
    torch_device()  # thread count and device before anything runs
    rows, cycle = [], None
    with tempfile.TemporaryDirectory(prefix="dcjax-train-speed-") as workdir:
        for case in _CASES.value:
            _log(f"{case} ...")
            if case == "dc_cycle":
                cycle = cycle_case(settings, workdir)
                print(json.dumps({k: v for k, v in cycle.items() if k != "rounds"}), flush=True)
            else:
                rows.append(step_case(case, settings, workdir))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "round_s"}), flush=True)
    machine = {
        **machine_info(),
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
    }
    report = {
        "machine": machine,
        "command": shlex.join(["python", *sys.argv]),
        "settings": {**dataclasses.asdict(settings), "quick": _QUICK.value},
        "wall_s": round(time.perf_counter() - wall, 1),
        "train_steps": rows,
        "cycle": cycle,
    }
    out = _OUT.value or default_out(_QUICK.value)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    _log(f"wrote {out} and its .md ({report['wall_s']} s)")


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before any timing
    app.run(main)
