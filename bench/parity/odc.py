"""ODC: dcjax beside open-mmlab/OpenSelfSup's own memory, re-weighting and neck, on identical
inputs.

Usage (from the repository root; needs the ``bench`` extra: torch 2.13.0 CPU, scikit-learn):

  python bench/parity/odc.py --official_root=/work/official [--parts=mdn]

It imports OpenSelfSup's (1db69ec) ``openselfsup/models/memories/odc_memory.py`` (the class
``ODCMemory``), ``ODC.set_reweight`` of ``openselfsup/models/odc.py`` and
``NonLinearNeckV0`` of ``openselfsup/models/necks.py`` from a plain checkout, runs them and
dcjax (``methods.odc``, ``clustering.online``, ``models.network.Trunk``) side by side, and
writes ``tests/parity/golden/odc_{memory,small,neck}.npz`` (the official repository and
commit, the inputs' seeds, the official outputs; ``tests/parity/test_odc.py`` reruns dcjax on
them without torch) and ``bench/results/parity_odc.md``.

Parts:
  (m) memory: 30 batches of 64 distinct examples on a memory of N = 2,000 non-negative unit
      rows (D = 32, K = 20), as ``ODC.forward_train`` and ``ODCHook.after_train_iter`` run
      them: the loss on the batch's labels with the previous step's weights
      (``nn.CrossEntropyLoss(weight)`` set by ``set_reweight``), ``update_samples_memory``
      (momentum 0.5, relabelling by the largest dot product), ``update_centroids_memory``
      after every 10th iteration, ``deal_with_small_clusters`` (minimum 5: none occurs here,
      part d covers it) and ``set_reweight``; against dcjax's ``loss_fn`` and jitted
      ``online_update`` with ``configs/odc.py``'s defaults (``memory_features="relu"``: the
      official receives the neck's post-ReLU output, dcjax the pre-ReLU one). Per step: the
      loss, the memory rows, the labels, the class weights; the centroids after steps 10, 20,
      30. On the official rows, the share of relabels that the Euclidean rule would change.
  (d) dissolve and refill: ``deal_with_small_clusters`` (minimum 20) on four small clusters
      (3-19 members) and an empty id beside five large clusters of two blobs each, against
      ``online.handle_small_clusters(metric="dot", split="whole", max_small=None)``: the
      member sets (up to which side of a split takes the freed id), the sizes, the centroids.
  (n) neck: ``NonLinearNeckV0(32, 16, 8)`` in eval mode against ``Trunk``'s
      ``neck_style="openselfsup"`` on the same weights.

Patches, in memory: P1 ``torch.Tensor.cuda`` -> identity; P2 ``odc_memory.py`` compiled from
its AST with stubs for ``mmcv.runner.get_dist_info`` (rank 0 of 1), ``torch.distributed``
(one process: ``all_gather`` copies, the rest do nothing) and the registry decorator, and
scikit-learn's ``KMeans`` with ``n_init=10`` (the default of the scikit-learn of 2020; today's
is 1); P3 ``set_reweight`` compiled from ``models/odc.py``'s AST and called on a holder with
the attributes it reads (``memory_bank``, ``num_classes``, ``loss_weight``, ``head``).
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
import time
import types
from pathlib import Path

import numpy as np

OFFICIAL_REPO = "open-mmlab/OpenSelfSup"
OFFICIAL_COMMIT = "1db69ecebbc129e8fa90cdcea6f2082f0a4e3d17"
ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = ROOT / "tests" / "parity" / "golden"
REPORT = ROOT / "bench" / "results" / "parity_odc.md"

MEM_SEED, MEM_N, MEM_D, MEM_K, MEM_B, MEM_STEPS, MEM_MIN = 31, 2000, 32, 20, 64, 30, 5
SMALL_SEED, SMALL_D, SMALL_MIN = 32, 16, 20
SMALL_HALVES = ((1100, 900), (1000, 800), (900, 700), (800, 600), (700, 500))
SMALL_TINY = (3, 7, 12, 19)
NECK_SEED, NECK_DIMS = 33, (32, 16, 8)
CENTROID_STEPS = (10, 20, 30)
ROW_STEPS = slice(4, None, 5)  # the memory rows of steps 5, 10, .., 30 go to the golden file


def _sibling(name: str) -> types.ModuleType:
    import importlib.util

    key = f"_parity_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Inputs (NumPy; the test regenerates them)
# --------------------------------------------------------------------------------------------


def memory_inputs(seed: int = MEM_SEED) -> dict[str, np.ndarray]:
    """The initial memory (N, D) non-negative unit rows around K directions, its labels (every
    cluster non-empty), the batches (S, B), the pre-ReLU features (S, B, D) and logits
    (S, B, K)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((MEM_K, MEM_D)))
    labels = np.r_[np.arange(MEM_K), rng.integers(0, MEM_K, MEM_N - MEM_K)].astype(np.int32)
    memory = unit_rows(np.abs(centres[labels] + 0.5 * rng.standard_normal((MEM_N, MEM_D))))
    batches = np.stack([rng.choice(MEM_N, MEM_B, replace=False) for _ in range(MEM_STEPS)])
    features = rng.standard_normal((MEM_STEPS, MEM_B, MEM_D)).astype(np.float32)
    features += 0.5 * centres[rng.integers(0, MEM_K, (MEM_STEPS, MEM_B))].astype(np.float32)
    logits = rng.standard_normal((MEM_STEPS, MEM_B, MEM_K)).astype(np.float32)
    return dict(
        memory=memory,
        labels=labels,
        batches=batches.astype(np.int32),
        features=features,
        logits=logits,
    )


def small_inputs(seed: int = SMALL_SEED) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, D) non-negative unit rows, (N,) labels, K: five large two-blob clusters, four small
    ones and an empty id (the last)."""
    rng = np.random.default_rng(seed)

    def blob(axis, m):
        return 4.0 * np.eye(SMALL_D)[axis] + 0.3 * rng.standard_normal((m, SMALL_D))

    large = [
        np.concatenate([blob(2 * j, a), blob(2 * j + 1, b)])
        for j, (a, b) in enumerate(SMALL_HALVES)
    ]
    parts = [*large, *[blob(10 + i, m) for i, m in enumerate(SMALL_TINY)]]
    memory = unit_rows(np.abs(np.concatenate(parts)))
    labels = np.concatenate([np.full(len(p), j) for j, p in enumerate(parts)]).astype(np.int32)
    return memory, labels, len(parts) + 1


def neck_weights(seed: int = NECK_SEED) -> dict[str, np.ndarray]:
    """NonLinearNeckV0's state dict (fc0, bn0 running statistics, fc1) and an input."""
    rng = np.random.default_rng(seed)
    i, h, o = NECK_DIMS
    return {
        "fc0.weight": (rng.standard_normal((h, i)) / np.sqrt(i)).astype(np.float32),
        "fc0.bias": (0.1 * rng.standard_normal(h)).astype(np.float32),
        "bn0.running_mean": (0.1 * rng.standard_normal(h)).astype(np.float32),
        "bn0.running_var": rng.uniform(0.5, 1.5, h).astype(np.float32),
        "fc1.weight": (rng.standard_normal((o, h)) / np.sqrt(h)).astype(np.float32),
        "fc1.bias": (0.1 * rng.standard_normal(o)).astype(np.float32),
        "x": rng.standard_normal((16, i)).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------
# dcjax's side (no torch)
# --------------------------------------------------------------------------------------------


def odc_settings(**fields):
    """``configs/odc.py``'s ODC settings (OpenSelfSup's geometry) at the harness's sizes."""
    import dataclasses

    from dcjax.config_base import load_config
    from dcjax.methods import odc

    config = load_config("odc", "")
    config.method.update(num_clusters=MEM_K, min_cluster_size=MEM_MIN, max_small_clusters=0)
    return dataclasses.replace(odc.read_settings(config), **fields)


def initial_state(memory: np.ndarray, labels: np.ndarray, k: int):
    import jax.numpy as jnp

    from dcjax.clustering import online
    from dcjax.methods import odc

    centroids, counts = online.cluster_means(
        jnp.asarray(memory), jnp.asarray(labels), jnp.zeros((k, memory.shape[1]))
    )
    return odc.ODCState(
        memory=jnp.asarray(memory),
        labels=jnp.asarray(labels),
        centroids=centroids,
        counts=counts,
        step=jnp.int32(0),
        epoch_labels=jnp.asarray(labels),
    )


def dcjax_memory_run(inputs: dict[str, np.ndarray], **fields) -> dict[str, np.ndarray]:
    """dcjax's loss and online update over the batches: per step the loss (before the update),
    the weights after it, the batch's rows and labels; centroids after ``CENTROID_STEPS``."""
    import jax
    import jax.numpy as jnp

    from dcjax.clustering import online
    from dcjax.methods import odc

    settings = odc_settings(**fields)
    state = initial_state(inputs["memory"], inputs["labels"], MEM_K)
    update = jax.jit(functools.partial(odc.online_update, settings))
    loss = jax.jit(functools.partial(odc.loss_fn, settings))
    out = {k: [] for k in ("losses", "rows", "labels", "weights", "centroids")}
    for t, indices in enumerate(inputs["batches"], start=1):
        idx = jnp.asarray(indices)
        value, _ = loss(state, {"logits": jnp.asarray(inputs["logits"][t - 1])}, idx)
        state, _ = update(state, {"features": jnp.asarray(inputs["features"][t - 1])}, idx)
        out["losses"].append(float(value))
        out["rows"].append(np.asarray(state.memory)[indices])
        out["labels"].append(np.asarray(state.labels)[indices])
        out["weights"].append(np.asarray(online.reweight(state.counts, settings.reweight_pow)))
        if t in CENTROID_STEPS:
            out["centroids"].append(np.asarray(state.centroids))
    return {k: np.asarray(v) for k, v in out.items()}


def dcjax_small(memory: np.ndarray, labels: np.ndarray, k: int) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    from dcjax.clustering import online

    state = initial_state(memory, labels, k)
    handle = jax.jit(
        online.handle_small_clusters,
        static_argnames=("min_size", "max_small", "split_iters", "metric", "split"),
    )
    clusters, found = handle(
        jax.random.PRNGKey(0),
        jnp.asarray(memory),
        state.clusters,
        min_size=SMALL_MIN,
        max_small=None,
        split_iters=20,
        metric="dot",
        split="whole",
    )
    return {
        "labels": np.asarray(clusters.labels),
        "centroids": np.asarray(clusters.centroids),
        "found": int(found),
    }


def same_partition(a: np.ndarray, b: np.ndarray, k: int) -> bool:
    """Whether two labelings group the rows into the same member sets (ids aside)."""
    sets = lambda x: {frozenset(np.where(x == j)[0]) for j in range(k)}  # noqa: E731
    return sets(a) == sets(b)


def matched_centroids(official_labels, official_centroids, labels, centroids, k) -> np.ndarray:
    """dcjax's centroids reordered to the official ids by member set (an unmatched id keeps
    its own)."""
    out = np.array(centroids, np.float64)
    for j in range(k):
        members = np.where(official_labels == j)[0]
        if len(members):
            out[j] = centroids[labels[members[0]]]
    return out


def dcjax_neck(weights: dict[str, np.ndarray]) -> np.ndarray:
    """``Trunk(neck_style="openselfsup")`` in eval mode on ``x`` (an identity backbone)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from dcjax.models.network import Trunk

    class Identity(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return {"features": x}

    _, h, o = NECK_DIMS
    trunk = Trunk(backbone=Identity(), neck=(h, o), neck_style="openselfsup")
    variables = {
        "params": {
            "neck_fc0": {"kernel": weights["fc0.weight"].T, "bias": weights["fc0.bias"]},
            "neck_fc1": {"kernel": weights["fc1.weight"].T, "bias": weights["fc1.bias"]},
        },
        "batch_stats": {
            "neck_bn0": {"mean": weights["bn0.running_mean"], "var": weights["bn0.running_var"]}
        },
    }
    return np.asarray(trunk.apply(variables, jnp.asarray(weights["x"]), train=False)["features"])


# --------------------------------------------------------------------------------------------
# The official side
# --------------------------------------------------------------------------------------------


class Official:
    """OpenSelfSup's ODCMemory, ODC.set_reweight and NonLinearNeckV0 with the patches."""

    def __init__(self, root: Path):
        import torch
        from sklearn.cluster import KMeans

        self.torch = torch
        self.checkout = root / "open-mmlab+OpenSelfSup"
        torch.Tensor.cuda = lambda self, *a, **k: self  # P1

        def all_gather(outputs, tensor, *a, **k):
            outputs[0].copy_(tensor)

        dist = types.SimpleNamespace(
            all_gather=all_gather,
            barrier=lambda *a, **k: None,
            broadcast=lambda *a, **k: None,
            all_reduce=lambda *a, **k: None,
        )
        namespace = dict(
            np=np,
            torch=torch,
            nn=torch.nn,
            dist=dist,
            KMeans=functools.partial(KMeans, n_init=10),
            get_dist_info=lambda: (0, 1),
            MEMORIES=types.SimpleNamespace(register_module=lambda cls: cls),
        )
        self.memory_class = self._compile(
            "openselfsup/models/memories/odc_memory.py", "ODCMemory", namespace
        )
        model_ns = dict(np=np, torch=torch, nn=torch.nn)
        odc_class = self._compile("openselfsup/models/odc.py", "ODC", model_ns, only="set_reweight")
        self.set_reweight = odc_class
        self.necks = _sibling("export_backbones")._load_odc_necks(str(self.checkout))

    def _compile(self, rel: str, cls: str, namespace: dict, only: str | None = None):
        """P2 / P3: class ``cls`` of ``rel`` compiled from the AST without its decorators (or
        only its method ``only``, returned as a function)."""
        path = self.checkout / rel
        tree = ast.parse(path.read_text(), str(path))
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        if only:
            body = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == only]
            assert len(body) == 1
        else:
            node.decorator_list = []
            body = [node]
        exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
        return namespace[only or cls]

    def memory_run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        memory = self.memory_class(MEM_N, MEM_D, 0.5, MEM_K, MEM_MIN)
        memory.init_memory(inputs["memory"].copy(), inputs["labels"].copy())
        holder = types.SimpleNamespace(
            memory_bank=memory,
            num_classes=MEM_K,
            loss_weight=torch.zeros(MEM_K),
            head=types.SimpleNamespace(),
        )
        self.set_reweight(holder)
        out = {k: [] for k in ("losses", "rows", "labels", "weights", "centroids", "euclid")}
        for t, indices in enumerate(inputs["batches"], start=1):
            idx = torch.as_tensor(indices, dtype=torch.int64)
            logits = torch.as_tensor(inputs["logits"][t - 1])
            out["losses"].append(float(holder.head.criterion(logits, memory.label_bank[idx])))
            feature = torch.relu(torch.as_tensor(inputs["features"][t - 1]))  # the neck's ReLU
            memory.update_samples_memory(idx, feature)
            rows = memory.feature_bank[idx].numpy().copy()
            centroids = memory.centroids.numpy().astype(np.float64)
            euclid = ((rows[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
            out["euclid"].append(np.mean(euclid != memory.label_bank[idx].numpy()))
            if t % 10 == 0:  # ODCHook: every_n_iters(10)
                memory.update_centroids_memory()
            memory.deal_with_small_clusters()
            self.set_reweight(holder)
            out["rows"].append(rows)
            out["labels"].append(memory.label_bank[idx].numpy().copy())
            out["weights"].append(holder.loss_weight.numpy().copy())
            if t in CENTROID_STEPS:
                out["centroids"].append(memory.centroids.numpy().copy())
        return {k: np.asarray(v) for k, v in out.items()}

    def small(self, memory: np.ndarray, labels: np.ndarray, k: int) -> dict[str, np.ndarray]:
        bank = self.memory_class(len(labels), memory.shape[1], 0.5, k, SMALL_MIN)
        bank.initialized = True
        bank.label_bank.copy_(self.torch.as_tensor(labels, dtype=self.torch.int64))
        bank.feature_bank.copy_(self.torch.as_tensor(memory))
        bank.centroids.copy_(bank._compute_centroids())  # the empty id keeps zeros
        bank.deal_with_small_clusters()
        return {"labels": bank.label_bank.numpy().copy(), "centroids": bank.centroids.numpy()}

    def neck(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        neck = self.necks.NonLinearNeckV0(*NECK_DIMS, with_avg_pool=False)
        state = {k: torch.as_tensor(v) for k, v in weights.items() if k != "x"}
        state["bn0.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
        neck.load_state_dict(state)
        neck.eval()
        with torch.no_grad():
            return neck([torch.as_tensor(weights["x"])])[0].numpy()


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def part_m(off: Official, report) -> dict[str, np.ndarray]:
    inputs = memory_inputs()
    official = off.memory_run(inputs)
    ours = dcjax_memory_run(inputs)
    report.compare(
        "m",
        "loss of each step (weighted CE, previous step's weights)",
        official["losses"],
        ours["losses"],
        1e-5,
    )
    report.compare("m", "memory rows written (30 x 64)", official["rows"], ours["rows"], 1e-5)
    differ = int(np.sum(official["labels"] != ours["labels"]))
    report.fact(
        "m",
        "labels of the batches (30 x 64)",
        "-",
        f"{differ} differ",
        "same" if differ == 0 else "DIFFERS",
    )
    report.compare("m", "class weights after each step", official["weights"], ours["weights"], 1e-6)
    report.compare(
        "m", "centroids after steps 10, 20, 30", official["centroids"], ours["centroids"], 1e-5
    )
    share = official["euclid"]
    report.fact(
        "m",
        "relabels the Euclidean rule would change (official rows and centroids)",
        f"mean {share.mean():.3f}",
        f"max {share.max():.3f}",
        "measured",
        "the geometry's effect per batch",
    )
    old = dcjax_memory_run(inputs, metric="euclidean", memory_relu=False)
    moved = float(np.mean(old["labels"] != official["labels"]))
    report.fact(
        "m",
        "dcjax's former geometry (raw features, Euclidean) on the same run",
        "-",
        f"{moved:.3f} of labels differ",
        "differs (expected)",
    )
    kept = {k: official[k] for k in ("losses", "labels", "weights", "centroids")}
    return {**kept, "rows": official["rows"][ROW_STEPS]}


def part_d(off: Official, report) -> dict[str, np.ndarray]:
    memory, labels, k = small_inputs()
    official = off.small(memory, labels, k)
    ours = dcjax_small(memory, labels, k)
    report.fact(
        "d",
        "small clusters found",
        len(SMALL_TINY) + 1,
        ours["found"],
        "same" if ours["found"] == len(SMALL_TINY) + 1 else "DIFFERS",
    )
    same = same_partition(official["labels"], ours["labels"], k)
    report.fact(
        "d",
        "member sets after dissolving and refilling",
        "-",
        "equal" if same else "not equal",
        "same" if same else "DIFFERS",
        "ids aside: which side of a split takes the freed id is the 2-means' numbering",
    )
    sizes = sorted(np.bincount(official["labels"], minlength=k).tolist())
    report.fact(
        "d",
        "cluster sizes",
        sizes,
        sorted(np.bincount(ours["labels"], minlength=k).tolist()),
        "same" if sizes == sorted(np.bincount(ours["labels"], minlength=k).tolist()) else "DIFFERS",
    )
    matched = matched_centroids(
        official["labels"], official["centroids"], ours["labels"], ours["centroids"], k
    )
    report.compare(
        "d",
        "centroids (matched by member set)",
        official["centroids"],
        matched,
        1e-5,
        note="the receivers of dissolved members keep their stale centroid on both sides",
    )
    return {"labels": official["labels"], "centroids": official["centroids"]}


def part_n(off: Official, report) -> dict[str, np.ndarray]:
    weights = neck_weights()
    official = off.neck(weights)
    ours = dcjax_neck(weights)
    report.compare(
        "n", "NonLinearNeckV0 output, eval mode (fc-BN-ReLU-Dropout-fc-ReLU)", official, ours, 1e-5
    )
    return {"out": official}


_PARTS = {"m": ("memory", part_m), "d": ("small", part_d), "n": ("neck", part_n)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official_root", type=Path, default=Path("/work/official"))
    parser.add_argument("--parts", default="mdn")
    parser.add_argument("--golden_dir", type=Path, default=GOLDEN_DIR)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    harness = _sibling("deepcluster_official")
    off, report, goldens = Official(args.official_root), harness.Report(), []
    for part in args.parts:
        name, fn = _PARTS[part]
        start = time.perf_counter()
        arrays = fn(off, report)
        report.notes.append(f"part {part} ({name}): {time.perf_counter() - start:.0f} s")
        goldens.append(
            harness.write_golden(
                name,
                arrays,
                args.golden_dir,
                prefix="odc",
                repo=OFFICIAL_REPO,
                commit=OFFICIAL_COMMIT,
            )
        )
    dv2 = _sibling("deepcluster_v2")
    header = (
        "# Parity: ODC against open-mmlab/OpenSelfSup (1db69ec)\n\n"
        "Written by `bench/parity/odc.py` (its docstring lists the parts, inputs and patches); "
        "`tests/parity/test_odc.py` reruns dcjax on the golden files in CI. dcjax runs "
        '`configs/odc.py`\'s defaults: `memory_features="relu"`, `relabel_metric="dot"`, '
        '`small_cluster_split="whole"`, `max_small_clusters=0`, `model.neck_style="openselfsup"`.'
    )
    dv2._HEADER, saved = header + "\n", dv2._HEADER
    try:
        dv2.write_report(report, args.out, goldens, "a 2-core AMD EPYC VM")
    finally:
        dv2._HEADER = saved
    for row in report.rows:
        print(" | ".join(str(c) for c in row))


if __name__ == "__main__":
    main()
