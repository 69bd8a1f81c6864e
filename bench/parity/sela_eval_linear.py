"""SeLa's linear probes (``eval_linear_probes.py``): the official ``Probes`` on the official
AlexNet, two steps of ``LinearProbesOptimizer.optimize_epoch`` and its ten-crop validation,
written as a golden file for dcjax's ``dcjax.evaluation.sela_probe``.

Usage (from the repository root; needs torch 2.13.0 CPU and the patched torchvision 0.28.0 of
bench/parity/README.md):

  python bench/parity/sela_eval_linear.py --official=/work/official/yukimasano+self-label

What runs, all official code (yukimasano/self-label 3891e37):

* ``model_with_probes(which='Imagenet')``: ``models/alexnet.py:alexnet`` (size 'big', batch
  norm, a 16-class ``top_layer``) loaded with a synthetic state_dict
  (``dcjax.models.torch_weights.synthetic_state_dict``: seeded NumPy draws, non-trivial BN
  statistics), ``util.search_absorb_bn``, ``util.sequential_skipping_bn_cut``, ReLUs made
  out-of-place, ``Probes(model, [1, 4, 7, 9, 11], num_classes=1000)``. The statistics of the
  official ``xavier_uniform_`` draws are recorded, then each probe's weight is replaced by a
  seeded NumPy draw of the same law (``probe_weight``) so that dcjax can start from it.
* ``LinearProbesOptimizer().get_optimizer(model)`` and ``optimize_epoch(..., is_validation=
  False)`` on one batch of 4 images at epoch 9 (lr 1e-2), then one at epoch 10 (lr 1e-3): each
  probe's max-pooled and batch-normed features and logits of the first step, the per-probe and
  summed losses, the learning rates, then the probes' weights (a sample), biases, BN running
  statistics and SGD momentum buffers after the two steps.
* ``data.get_standard_data_loader(<folder>, is_validation=True, batch_size=30, tencrops=True)``
  on 3 images of 256 x 256 (PNG, so ``Resize(256)`` keeps their pixels), ``TenCrop(224)``;
  labels chosen from the official's own conv5 ranking (ranks 1, 3, 41: a top-1 hit, a top-5
  hit, a miss for that probe); ``optimize_epoch(..., epoch=26, is_validation=True)``: the
  averaged logits per probe, their loss, top-1 / top-5, and ``util.accuracy`` per image.

The training images (N(0, 1) float32 inputs), labels, validation images (uint8), the probes'
initial weights and the sampled rows come from the NumPy generators below, so the test
regenerates them; the golden file holds the seeds, the state_dict's keys and shapes and the
official outputs (subsampled where large), about 0.4 MiB. The comparison with dcjax and the
tolerances are ``tests/parity/test_sela_eval_linear.py``'s (``dcjax_quantities``), which this
script also runs to write ``bench/results/parity_sela_eval_linear.md``.

Patches, all in memory (the checkout is never modified):

* P1 ``eval_linear_probes.py`` is compiled from its source with ``'cuda:0'`` -> ``'cpu'`` (the
  ``.to('cuda:0')`` calls of ``optimize`` and ``optimize_epoch``), and ``util.py`` (before it,
  so that its ``import util`` / ``from util import accuracy`` and ``data.py``'s get it) with
  ``correct[:k].view(-1)`` -> ``correct[:k].reshape(-1)`` in ``accuracy`` (a slice of a
  transposed tensor cannot be viewed since torch 1.x; the values are the same);
  ``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` -> identity (``input.cuda()`` in
  ``optimize_epoch``).
* P2 the module globals that only its ``__main__`` block sets: ``args`` (a Namespace: ``arch``
  'alexnet', ``data`` 'Imagenet', ``tencrops`` True, the defaults) and ``writer`` (an object
  whose ``add_scalars`` does nothing; tensorboardX itself is imported, or stubbed when absent).
* P3 ``torch.load`` returns the synthetic state_dict while ``model_with_probes`` runs (it
  loads ``model_path`` from disk).
* P4 observers, which change no value: forward hooks on the probed ReLUs and on each probe's
  pool and batch norm (first step only), and a criterion that records each probe's logits and
  loss before returning ``nn.CrossEntropyLoss()``'s result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

OFFICIAL_REPO = "yukimasano/self-label"
OFFICIAL_COMMIT = "3891e376a82d1e4ac6de6d39505b692b8885c971"
ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "parity" / "golden" / "sela_eval_linear.npz"
REPORT = ROOT / "bench" / "results" / "parity_sela_eval_linear.md"
TEST = ROOT / "tests" / "parity" / "test_sela_eval_linear.py"

PROBED = (1, 4, 7, 9, 11)  # model_with_probes: the ReLUs of conv1..conv5 after the BN cut
NUM_CLASSES, TOP_CLASSES = 1000, 16  # Probes' classes (Imagenet); the trunk's own head
TRAIN_BATCH, TRAIN_EPOCHS = 4, (9, 10)  # one batch per epoch, across the first lr drop
VAL_IMAGES, VAL_SIDE, VAL_RANKS = 3, 256, (0, 2, 40)
WEIGHT_SEED, SCALE = 41, 0.1
INPUT_SEED, LABEL_SEED, IMAGE_SEED, PROBE_SEED, SAMPLE_SEED = 43, 53, 59, 47, 61
# What is stored of the large arrays: the first channels, pixel strides, sampled weights.
SUB_CHANNELS, RELU_STRIDE, CROP_STRIDE, SUB_CLASSES, SUB_COLUMNS = 16, 8, 28, 32, 128


# --------------------------------------------------------------------------------------------
# The inputs: NumPy only, imported by the test.
# --------------------------------------------------------------------------------------------


def train_inputs() -> np.ndarray:
    """(2, 4, 3, 224, 224) float32 N(0, 1): the two training batches, NCHW."""
    shape = (len(TRAIN_EPOCHS), TRAIN_BATCH, 3, 224, 224)
    return np.random.default_rng(INPUT_SEED).standard_normal(shape, dtype=np.float32)


def train_labels() -> np.ndarray:
    """(2, 4) int64 classes in [0, 1000)."""
    shape = (len(TRAIN_EPOCHS), TRAIN_BATCH)
    return np.random.default_rng(LABEL_SEED).integers(0, NUM_CLASSES, shape)


def val_images() -> np.ndarray:
    """(3, 256, 256, 3) uint8: smooth random images (a coarse grid upsampled, plus noise)."""
    rng = np.random.default_rng(IMAGE_SEED)
    coarse = rng.uniform(0, 255, (VAL_IMAGES, 8, 8, 3))
    smooth = np.repeat(np.repeat(coarse, VAL_SIDE // 8, axis=1), VAL_SIDE // 8, axis=2)
    noisy = smooth + rng.normal(0, 20, smooth.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def probe_kernel(k: int, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Probe k's initial weight for a (classes, C, h, w) official weight, as dcjax's
    (h w C, classes) float32 kernel: ``xavier_uniform_``'s law (bound
    sqrt(6 / ((C + classes) h w))) drawn from ``default_rng([PROBE_SEED, k])`` in that order."""
    classes, channels, height, width = shape
    bound = np.float32(np.sqrt(6.0 / ((channels + classes) * height * width)))
    rng = np.random.default_rng([PROBE_SEED, k])
    draw = rng.random((height * width * channels, classes), dtype=np.float32)
    return (np.float32(2.0) * draw - 1) * bound


def probe_weight(k: int, shape: tuple[int, int, int, int]) -> np.ndarray:
    """``probe_kernel`` as the official (classes, C, h, w) weight."""
    classes, channels, height, width = shape
    kernel = probe_kernel(k, shape).reshape(height, width, channels, classes)
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def sampled(k: int, shape: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(classes, columns) of probe k's weight that the golden file keeps: sorted indices into
    its rows (the training labels, whose rows move most, then random ones) and its
    (C, h, w)-flattened columns."""
    rng = np.random.default_rng([SAMPLE_SEED, k])
    labels = np.unique(train_labels())
    others = np.setdiff1d(np.arange(shape[0]), labels)
    extra = rng.choice(others, SUB_CLASSES - len(labels), replace=False)
    columns = int(np.prod(shape[1:]))
    return (
        np.sort(np.concatenate([labels, extra])),
        np.sort(rng.choice(columns, SUB_COLUMNS, replace=False)),
    )


def subsample(name: str, array: np.ndarray) -> np.ndarray:
    """What is stored of an NCHW map (or (..., C, H, W) crops)."""
    if name.startswith("relu"):
        return array[:, :SUB_CHANNELS, ::RELU_STRIDE, ::RELU_STRIDE]
    if name.startswith(("pooled", "bn")):
        return array[:, :SUB_CHANNELS]
    if name == "val_crops":
        return array[..., ::CROP_STRIDE, ::CROP_STRIDE]
    return array


# --------------------------------------------------------------------------------------------
# The official side.
# --------------------------------------------------------------------------------------------


class _Writer:
    def add_scalars(self, *args, **kwargs):
        pass


def _compiled(official: Path, name: str, edits: dict[str, str]) -> types.ModuleType:
    """``<official>/<name>.py`` compiled with textual ``edits``, registered as ``name``."""
    path = official / f"{name}.py"
    source = path.read_text()
    for old, new in edits.items():
        if old not in source:
            raise SystemExit(f"{path.name} no longer contains {old!r}: check the patches")
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102
    return module


def _official_module(official: Path):
    """eval_linear_probes.py and util.py compiled with the P1 edits, the P2 globals set."""
    sys.path.insert(0, str(official))
    try:
        import tensorboardX  # noqa: F401
    except ImportError:  # P2: only __main__ makes a SummaryWriter
        sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=None)
    _compiled(official, "util", {"correct[:k].view(-1)": "correct[:k].reshape(-1)"})
    module = _compiled(official, "eval_linear_probes", {"'cuda:0'": "'cpu'"})
    module.args = argparse.Namespace(arch="alexnet", data="Imagenet", tencrops=True)
    module.writer = _Writer()
    return module


class _Criterion:
    """nn.CrossEntropyLoss() that records each call's logits and loss (P4)."""

    def __init__(self, torch):
        self._loss = torch.nn.CrossEntropyLoss()
        self.logits, self.losses = [], []

    def __call__(self, prediction, label):
        loss = self._loss(prediction, label)
        self.logits.append(prediction.detach().numpy().copy())
        self.losses.append(loss.item())
        return loss


def _build(el, torch, shapes) -> object:
    """model_with_probes on the synthetic state_dict (P3)."""
    from dcjax.models.torch_weights import synthetic_state_dict

    sd = synthetic_state_dict(shapes, WEIGHT_SEED, SCALE)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    load = torch.load
    torch.load = lambda *a, **k: dict(tensors)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return el.model_with_probes(model_path="<synthetic>", which="Imagenet")
    finally:
        torch.load = load


def _hooks(model, record: dict):
    """Forward hooks (P4) recording, once, each probe's input (the probed ReLU's output:
    ``Probes.forward`` calls the trunk's layers by ``.forward``, which runs no hook), pool
    and batch norm."""
    handles = []

    def keep(name, of_input=False):
        def hook(module, inputs, output):
            value = inputs[0] if of_input else output
            record.setdefault(name, value.detach().numpy().copy())

        return hook

    for j, probe in enumerate(model.probes, start=1):
        handles.append(probe.register_forward_hook(keep(f"relu{j}", of_input=True)))
        handles.append(probe[0].register_forward_hook(keep(f"pooled{j}")))
        handles.append(probe[1].register_forward_hook(keep(f"bn{j}")))
    return handles


def _val_loader(el, torch, root: Path):
    """The official validation loader over the 3 images, one class folder each."""
    from PIL import Image

    for i, image in enumerate(val_images()):
        (root / f"c{i}").mkdir(parents=True)
        Image.fromarray(image).save(root / f"c{i}" / "0.png")
    return el.get_standard_data_loader(
        str(root), is_validation=True, batch_size=10 * VAL_IMAGES, num_workers=0, tencrops=True
    )


def run_official(official: Path) -> dict[str, np.ndarray]:
    """Every official quantity of the module docstring, as arrays (NCHW layouts)."""
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self  # P1
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.set_num_threads(2)
    torch.manual_seed(0)
    el = _official_module(official)
    template = el.models.alexnet(num_classes=[TOP_CLASSES])
    shapes = [(k, tuple(v.shape)) for k, v in template.state_dict().items()]
    model = _build(el, torch, shapes)
    out: dict[str, np.ndarray] = {"state_dict": np.array(json.dumps(shapes))}
    for j, probe in enumerate(model.probes, start=1):
        weight = probe[2].weight.detach().numpy()
        out[f"weight_shape{j}"] = np.array(weight.shape, np.int64)
        out[f"official_init_stats{j}"] = np.array([np.abs(weight).max(), weight.var()])
        assert not probe[2].bias.detach().numpy().any()
        assert probe[1].affine is False and probe[0].padding == (3, 0, 1, 1, 0)[j - 1]
        with torch.no_grad():
            probe[2].weight.copy_(torch.from_numpy(probe_weight(j, weight.shape)))

    opt = el.LinearProbesOptimizer()
    optimizer = opt.get_optimizer(model)
    criterion, record = _Criterion(torch), {}
    handles = _hooks(model, record)
    x, y = train_inputs(), train_labels()
    lrs = []
    with contextlib.redirect_stdout(io.StringIO()):
        for step, epoch in enumerate(TRAIN_EPOCHS):
            loader = [(torch.from_numpy(x[step]), torch.from_numpy(y[step]))]
            opt.optimize_epoch(model, criterion, optimizer, loader, epoch, is_validation=False)
            lrs.append(optimizer.param_groups[0]["lr"])
    for handle in handles:
        handle.remove()
    probes = len(PROBED)
    out.update({name: subsample(name, value) for name, value in record.items()})
    out["losses"] = np.array(criterion.losses).reshape(len(TRAIN_EPOCHS), probes)
    out["lrs"] = np.array(lrs)
    for j, probe in enumerate(model.probes, start=1):
        out[f"logits{j}"] = criterion.logits[j - 1]  # the first step's
        weight = probe[2].weight.detach().numpy()
        rows, columns = sampled(j, weight.shape)
        flat = weight.reshape(weight.shape[0], -1)
        out[f"weight_after{j}"] = flat[rows][:, columns]
        out[f"bias_after{j}"] = probe[2].bias.detach().numpy().copy()
        buffer = optimizer.state[probe[2].weight]["momentum_buffer"].numpy()
        out[f"momentum_after{j}"] = buffer.reshape(weight.shape[0], -1)[rows][:, columns]
        out[f"running_mean{j}"] = probe[1].running_mean.numpy().copy()
        out[f"running_var{j}"] = probe[1].running_var.numpy().copy()
    out.update(_run_validation(el, torch, model, opt, optimizer))
    return out


def _run_validation(el, torch, model, opt, optimizer) -> dict[str, np.ndarray]:
    """The ten-crop validation epoch on the official loader, labels from conv5's ranking."""
    with tempfile.TemporaryDirectory() as tmp:
        ((crops, _),) = list(_val_loader(el, torch, Path(tmp)))
    model.eval()
    with torch.no_grad():
        conv5 = model(crops.view(-1, *crops.shape[2:]))[-1].view(VAL_IMAGES, 10, -1).mean(1)
    order = torch.argsort(conv5, dim=1, descending=True, stable=True)
    labels = torch.stack([order[i, r] for i, r in enumerate(VAL_RANKS)])
    criterion = _Criterion(torch)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        metrics = opt.optimize_epoch(
            model, criterion, optimizer, [(crops, labels)], 26, is_validation=True
        )
    out = {
        "val_labels": labels.numpy(),
        "val_crops": subsample("val_crops", crops.numpy()),
        "val_top1": np.array(metrics["top1"]),
        "val_top5": np.array(metrics["top5"]),
        "val_loss": np.array(metrics["loss"]),
    }
    hits = []
    for j, logits in enumerate(criterion.logits, start=1):
        out[f"val_logits{j}"] = logits
        per_image = [
            [
                float(a)
                for a in el.accuracy(torch.from_numpy(logits[i : i + 1]), labels[i : i + 1], (1, 5))
            ]
            for i in range(VAL_IMAGES)
        ]
        hits.append(per_image)
    out["val_hits"] = np.array(hits) / 100.0  # (probe, image, top-1 / top-5)
    return out


# --------------------------------------------------------------------------------------------
# The golden file and the report.
# --------------------------------------------------------------------------------------------


def _test_module():
    spec = importlib.util.spec_from_file_location("sela_eval_linear_test", TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_report(golden: dict[str, np.ndarray], path: Path) -> list[tuple]:
    """Runs dcjax on the golden file (the test's ``dcjax_quantities``) and writes the table."""
    test = _test_module()
    ours = test.dcjax_quantities(golden)
    rows = test.compare(ours, golden)
    lines = [
        "# Parity: SeLa's linear probes (`eval_linear_probes.py`) vs dcjax",
        "",
        f"Official: {OFFICIAL_REPO} @ {OFFICIAL_COMMIT} (`eval_linear_probes.py`: "
        "`model_with_probes`, `Probes`, `LinearProbesOptimizer`; `data.py:"
        "get_standard_data_loader`; `util.py`); torch "
        f"{golden['torch_version']}. Written by `bench/parity/sela_eval_linear.py`; "
        "`tests/parity/test_sela_eval_linear.py` replays dcjax on "
        "`tests/parity/golden/sela_eval_linear.npz` at these tolerances.",
        "",
        "Setup: the official AlexNet ('big', batch norm) with synthetic weights (seed "
        f"{WEIGHT_SEED}), BN absorbed and cut as `model_with_probes` does, 1000-class probes on "
        "the ReLUs of conv1..conv5; dcjax: the same state_dict mapped by "
        "`dcjax.models.torch_weights` into its AlexNet in eval mode (batch norm by running "
        "statistics instead of absorbed), then the runner `training.sela_eval.SelaProbe`'s "
        "step (`sela_probe.probe_features`, `probe_kernels.probe_loss` / `sgd_update` at "
        "`sela_probe.learning_rate`), test views (`data.crops.ten_crop_views`) and test "
        "scores (running statistics, `sela_probe.crop_scores`). Two "
        f"training steps of {TRAIN_BATCH} N(0, 1) images at epochs 9 and 10 (lr 1e-2 then "
        f"1e-3); validation on {VAL_IMAGES} images of 256 x 256 through the official loader "
        "(Resize 256 + TenCrop 224).",
        "",
        "Tolerance: max |dcjax - official| <= rel x max |official| + abs (float32 on both "
        "sides); per-image hits exactly, the official top-1 / top-5 % (float32 arithmetic) to "
        "1e-6. `update<j>` is the sampled weight after two steps minus before: it holds the "
        "32 classes of the 8 training labels and 24 others, so the gradient paths are "
        "compared at the size of the change, not of the weight.",
        "",
        "| quantity | what | max abs diff | / max abs official | tolerance | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, what, diff, scale, tol, ok in rows:
        rel = diff / scale if scale else float("nan")
        verdict = "pass" if ok else "FAIL"
        lines.append(f"| `{name}` | {what} | {diff:.2e} | {rel:.2e} | {tol} | {verdict} |")
    init = [golden[f"official_init_stats{j}"] for j in range(1, 6)]
    bounds = [test.xavier_bound(tuple(golden[f"weight_shape{j}"])) for j in range(1, 6)]
    lines += [
        "",
        "Initialisation: the official `xavier_uniform_` draws (before they are replaced by the "
        "seeded ones) against dcjax's law U(+-b), b = sqrt(6 / ((C + classes) h w)):",
        "",
        "| probe | weight | b | official max abs / b | official var / (b^2 / 3) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for j, ((maxabs, var), bound) in enumerate(zip(init, bounds, strict=True), start=1):
        shape = "x".join(map(str, golden[f"weight_shape{j}"]))
        lines.append(
            f"| conv{j} | {shape} | {bound:.3e} | {maxabs / bound:.6f} | "
            f"{var / (bound**2 / 3):.4f} |"
        )
    lines += [
        "",
        "Notes:",
        "",
        "- Not compared here: the training view `RandomResizedCrop(224)` + flip (dcjax draws "
        "torchvision's box with `augment.torchvision_crop_box`, tested line by line against "
        "torchvision in `tests/data/test_augment.py`; the two sides cannot share random "
        "draws). The whole training loop (epochs, partial batches, rates, the tested epochs) "
        "is replayed in float64 by `tests/training/test_sela_eval.py`.",
        "- Found in the official code: `--learning-rate` is read and stored (`o.lr`) but the "
        "schedule ignores it (`zheng_lr_schedule`); `Probes.forward` calls the trunk's layers "
        "by `.forward`, so no hook on them fires (the ReLU maps are recorded as the probes' "
        "inputs); a last training batch of one image would make `.squeeze()` drop its batch "
        "axis; the validation batch is `int(192 / 10)` = 19 images.",
        "- The trunks: the official folds each BN into the conv before it "
        "(`util.absorb_bn`), dcjax applies it with running statistics after the conv; the "
        "ReLU maps agree to 1e-6 of their scale, which is float32 rounding.",
    ]
    path.write_text("\n".join(lines) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path)
    parser.add_argument("--out", default=str(GOLDEN))
    parser.add_argument("--report", default=str(REPORT))
    flags = parser.parse_args()
    import torch

    golden = {
        "official_repo": np.array(OFFICIAL_REPO),
        "official_commit": np.array(OFFICIAL_COMMIT),
        "torch_version": np.array(torch.__version__),
        "numpy_version": np.array(np.__version__),
        "seeds": np.array([WEIGHT_SEED, INPUT_SEED, LABEL_SEED, IMAGE_SEED, PROBE_SEED]),
        "scale": np.float64(SCALE),
    }
    golden.update(run_official(flags.official))
    np.savez_compressed(flags.out, **golden)
    print(f"wrote {flags.out} ({Path(flags.out).stat().st_size / 1024:.0f} KiB)")
    with np.load(flags.out) as f:
        rows = write_report(dict(f), Path(flags.report))
    for name, _, diff, scale, tol, ok in rows:
        rel = diff / scale if scale else 0.0
        print(f"{name:18s} {diff:.2e} {rel:.2e} {tol} {'ok' if ok else 'FAIL'}")
    print(f"wrote {flags.report}")
    if not all(row[-1] for row in rows):
        raise SystemExit("some quantities are outside their tolerance")


if __name__ == "__main__":
    main()
