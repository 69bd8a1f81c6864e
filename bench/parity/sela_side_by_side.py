"""SeLa beside the official self-label CIFAR code at the same CPU budget, on the same images.

    python bench/parity/sela_side_by_side.py --official=/work/official/yukimasano+self-label \
        --cifar=<CIFAR-10 JPEG folder with train/ and test/> --seeds=0,1,2 --epochs=15

Both sides train SeLa's official CIFAR recipe (``scripts/cifar.sh`` + ``cifar.py``; dcjax:
``configs/sela.py:cifar10_official,cpu``) at 64 px on the same subset (``--per_class`` training
and ``--test_per_class`` test JPEGs of each class, the first by file name, linked into
``--work``/subset), with ``hc`` heads of K clusters, ``--epochs`` epochs and a label step every
epoch. Each run records, per epoch, the official kNN (10 neighbours weighted exp(sim / 0.1) on
post-ReLU fc7) and the seconds spent training and labelling (the kNN excluded); at the end the
kNN after PCA-128 on the final weights, the NMI of each head's labels with the classes and the
largest cluster share. The table goes to ``--out`` (``experiments/results/sela_vs_official_cpu``
.md / .json); every finished run is kept in ``--work``/runs.jsonl and not rerun.

The official code runs from its checkout in a child process (``--_child``), patched in memory:
  O1 ``tensorboardX`` is a stub (its ``SummaryWriter`` does nothing).
  O2 ``.cuda()`` of tensors and modules returns them unchanged (CPU).
  O3 ``util.setup_runtime`` seeds with ``--seed`` (the script always seeds 2).
  O4 ``cifar_utils.CIFAR10Instance`` reads the JPEG subset (same (image, target, index) items
     and ``targets`` / ``transform`` attributes as the torchvision class it replaces).
  O5 64 px: torchvision's ``Resize(256)``, ``RandomResizedCrop(224)`` and ``CenterCrop(224)``
     become ``Resize(73)``, ``RandomResizedCrop(64)`` and ``CenterCrop(64)`` (the 256 / 224 ratio
     kept); ``models/alexnet.py`` flattens the conv output whatever its size (256 x 1 x 1 at 64
     px) and fc6 takes 256 inputs (its source edited in memory: ``256 * 6 * 6`` -> ``256``).
  O6 observing wrapper on ``cifar_utils.kNN``: it times each call and copies the current labels
     (``selflabels`` of the script's namespace); nothing else changes.
  O7 the final ``torch.load`` of the best checkpoint reads with ``weights_only=False`` (the
     default of current torch refuses the checkpoint's optimiser dict).
The official reports the kNN of its best epoch (chosen on the test split); the table gives the
last epoch's and the best epoch's for both sides.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
import types

import numpy as np

OFFICIAL_REPO = "yukimasano/self-label"
OFFICIAL_COMMIT = "3891e376a82d1e4ac6de6d39505b692b8885c971"
SIZE, RESIZE, CROP, FULL = 64, 73, 224, 256  # 64 px, Resize(73): 256 / 224 of the crop
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_subset(source: str, dest: str, per_class: int, test_per_class: int) -> str:
    """Links the first ``per_class`` / ``test_per_class`` JPEGs (by name) of each class of
    ``source``/{train,test} into ``dest``; returns ``dest``."""
    for split, count in (("train", per_class), ("test", test_per_class)):
        for cls in sorted(os.listdir(os.path.join(source, split))):
            src = os.path.join(source, split, cls)
            out = os.path.join(dest, split, cls)
            os.makedirs(out, exist_ok=True)
            for name in sorted(os.listdir(src))[:count]:
                link = os.path.join(out, name)
                if not os.path.exists(link):
                    os.symlink(os.path.abspath(os.path.join(src, name)), link)
    return dest


def label_figures(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """NMI of head 0 and mean over heads with ``truth``, and the largest cluster share."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    per_head = [nmi(truth, h) for h in labels]
    share = max(np.bincount(h).max() / h.size for h in labels)
    return {"nmi_head0": per_head[0], "nmi_mean": float(np.mean(per_head)), "largest": share}


# ----------------------------------------------------------------------------- the official side


def _jpeg_dataset(folder: str):
    """O4: a CIFAR10Instance over the JPEG folder (sorted classes, sorted files)."""
    import torch
    from PIL import Image

    class JpegCifarInstance(torch.utils.data.Dataset):
        def __init__(self, root=None, train=True, transform=None, target_transform=None, **_):
            split = os.path.join(folder, "train" if train else "test")
            self.files, self.targets = [], []
            for c, cls in enumerate(sorted(os.listdir(split))):
                names = sorted(os.listdir(os.path.join(split, cls)))
                self.files += [os.path.join(split, cls, n) for n in names]
                self.targets += [c] * len(names)
            self.transform, self.target_transform = transform, target_transform

        def __len__(self):
            return len(self.files)

        def __getitem__(self, index):
            img = Image.open(self.files[index]).convert("RGB")
            if self.transform is not None:
                img = self.transform(img)
            return img, self.targets[index], index

    return JpegCifarInstance


def _resized(cls, mapping: dict[int, int]):
    """O5: ``cls`` with its size argument mapped (256 -> 73, 224 -> 64)."""

    class Resized(cls):
        def __init__(self, size, *args, **kwargs):
            super().__init__(mapping.get(size, size), *args, **kwargs)

    return Resized


def _patch_alexnet(module) -> None:
    """O5: fc6 on 256 x 1 x 1 and a flatten of any size, by editing the methods' source."""
    cls = module.AlexNet
    for name in ("__init__", "forward"):
        source = inspect.getsource(getattr(cls, name))
        lines = source.splitlines()
        indent = len(lines[0]) - len(lines[0].lstrip())
        source = "\n".join(line[indent:] for line in lines).replace("256 * 6 * 6", "256")
        source = source.replace("x.view(x.size(0), 256)", "x.view(x.size(0), -1)")
        namespace: dict = {}
        exec(compile(source, module.__file__, "exec"), vars(module), namespace)  # noqa: S102
        if name == "__init__":  # super(AlexNet, self) resolves the module's global AlexNet
            namespace[name].__globals__["AlexNet"] = cls
        setattr(cls, name, namespace[name])


class _NullWriter:
    """O1: a SummaryWriter whose every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def official_child(args) -> None:
    """Runs ``cifar.py`` in this process with patches O1-O7; writes ``--record`` (JSON)."""
    import runpy

    import torch
    import torchvision.transforms as tfs

    torch.set_num_threads(2)
    sys.path.insert(0, args.official)
    stub = types.ModuleType("tensorboardX")
    stub.SummaryWriter = _NullWriter  # O1
    sys.modules["tensorboardX"] = stub
    torch.Tensor.cuda = lambda self, *a, **k: self  # O2
    torch.nn.Module.cuda = lambda self, *a, **k: self
    import cifar_utils
    import models.alexnet  # noqa: F401 (registers sys.modules["models.alexnet"])
    import util

    seeded = util.setup_runtime
    util.setup_runtime = lambda seed=0, cuda_dev_id=(0,): seeded(args.seed, list(cuda_dev_id))
    cifar_utils.CIFAR10Instance = _jpeg_dataset(args.subset)  # O4
    sizes = {FULL: RESIZE, CROP: SIZE}
    tfs.Resize = _resized(tfs.Resize, sizes)  # O5
    tfs.RandomResizedCrop = _resized(tfs.RandomResizedCrop, sizes)
    tfs.CenterCrop = _resized(tfs.CenterCrop, sizes)
    _patch_alexnet(sys.modules["models.alexnet"])
    records, knn = [], cifar_utils.kNN
    start = time.perf_counter()

    def observed_knn(*a, **k):  # O6
        before = time.perf_counter()
        acc = knn(*a, **k)
        labels = sys._getframe(1).f_globals.get("selflabels")
        records.append(
            {
                "t_start": before - start,
                "seconds": time.perf_counter() - before,
                "acc": acc,
                "use_pca": bool(k.get("use_pca", False)),
                "labels": None if labels is None else np.asarray(labels).tolist(),
            }
        )
        return acc

    cifar_utils.kNN = observed_knn
    load = torch.load
    torch.load = lambda *a, **k: load(*a, **{**k, "weights_only": False})  # O7
    sys.argv = [
        "cifar.py",
        *("--arch", "alexnet", "--hc", str(args.hc), "--ncl", str(args.k)),
        *("--nopts", str(args.epochs), "--epochs", str(args.epochs)),
        *("--batch-size", "128", "--lr", "0.03", "--type", "10", "--device", "0"),
        *("--datadir", args.subset, "--exp", args.exp),
    ]
    os.makedirs(args.exp, exist_ok=True)
    runpy.run_path(os.path.join(args.official, "cifar.py"), run_name="__main__")
    with open(args.record, "w") as f:
        json.dump(records, f)


def official_run(args, seed: int) -> dict:
    """One official run in a child process; its row."""
    exp = os.path.join(args.work, f"official-seed{seed}")
    record = os.path.join(exp, "record.json")
    os.makedirs(exp, exist_ok=True)
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        *(f"--official={args.official}", f"--subset={args.subset}", f"--exp={exp}"),
        *(f"--record={record}", f"--seed={seed}", f"--epochs={args.epochs}"),
        *(f"--hc={args.hc}", f"--k={args.k}"),
    ]
    start = time.perf_counter()
    with open(os.path.join(exp, "log.txt"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    with open(record) as f:
        records = json.load(f)
    epochs = [r for r in records if not r["use_pca"] and r["labels"] is not None]
    epochs = epochs[: args.epochs]  # per-epoch calls; the final test-only call has use_pca
    truth = np.asarray(_jpeg_dataset(args.subset)().targets)
    times, free = [], 0.0  # per epoch: from the end of the last kNN call to the next epoch's
    for r in records:
        if r in epochs:
            times.append(r["t_start"] - free)
        free = r["t_start"] + r["seconds"]
    final_pca = [r["acc"] for r in records if r["use_pca"]]
    accs = [r["acc"] for r in epochs]
    return {
        "side": "official",
        "seed": seed,
        "knn_last": accs[-1],
        "knn_best": max(accs),
        "knn_pca_final": final_pca[-1] if final_pca else float("nan"),
        **label_figures(np.asarray(epochs[-1]["labels"]), truth),
        "seconds_per_epoch": float(np.median(times)),
        "wall": wall,
    }


# ----------------------------------------------------------------------------- dcjax's side


def dcjax_config(args, seed: int):
    from dcjax.config_base import load_config

    config = load_config("sela", "cifar10_official,cpu")
    config.data.path = args.subset
    config.num_cycles = args.epochs
    config.method.update(num_heads=args.hc, num_clusters=args.k)
    config.eval_every_cycles = 1  # the official scores its kNN after every epoch
    config.eval.probe_epochs = 1  # the linear probe is not part of this comparison
    config.seed = seed
    return config


def dcjax_run(args, seed: int) -> dict:
    """One dcjax run (resumed when its workdir holds one); its row."""
    from dcjax.data import sources
    from dcjax.training import loop
    from dcjax.training.metrics import read_jsonl

    config = dcjax_config(args, seed)
    workdir = os.path.join(args.work, f"dcjax-seed{seed}")
    start = time.perf_counter()
    trained = loop.run(config, workdir)["trained"]  # the last epoch's evaluation
    wall = time.perf_counter() - start
    logged = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    accs = [r["eval/sela_knn_accuracy"] for r in logged if "eval/sela_knn_accuracy" in r]
    accs.append(trained["sela_knn_accuracy"])
    seconds = [r["time/cycle_seconds"] for r in logged if "time/cycle_seconds" in r]
    last = sorted(os.listdir(os.path.join(workdir, "pseudo_labels")), key=lambda n: int(n[6:-4]))[
        -1
    ]
    with np.load(os.path.join(workdir, "pseudo_labels", last)) as f:
        labels = f["labels"]
    truth = sources.load(config.data, int(config.input.image_size)).train_labels
    return {
        "side": "dcjax",
        "seed": seed,
        "knn_last": accs[-1],
        "knn_best": max(accs),
        "knn_pca_final": trained["sela_knn_pca_accuracy"],
        **label_figures(labels, truth),
        "seconds_per_epoch": float(np.median(seconds)),
        "wall": wall,
    }


# ----------------------------------------------------------------------------- the table

COLUMNS = (
    ("knn_last", "kNN last epoch", 4),
    ("knn_best", "kNN best epoch", 4),
    ("knn_pca_final", "kNN PCA-128 final", 4),
    ("nmi_head0", "NMI head 0", 3),
    ("nmi_mean", "NMI mean of heads", 3),
    ("largest", "largest cluster share", 4),
    ("seconds_per_epoch", "s / epoch (train + labels, median)", 1),
)


def table(rows: list[dict], header: list[str]) -> str:
    lines = [*header, "", "| side | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"]
    lines.append("|" + " --- |" * (2 + len(COLUMNS)))
    for side in ("official", "dcjax"):
        mine = [r for r in rows if r["side"] == side]
        if not mine:
            continue
        cells = [side, ", ".join(str(r["seed"]) for r in mine)]
        for key, _, digits in COLUMNS:
            values = np.asarray([r[key] for r in mine], float)
            cells.append(f"{values.mean():.{digits}f} +- {values.std():.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True)
    parser.add_argument("--cifar", default="", help="CIFAR-10 JPEG folder (train/, test/)")
    parser.add_argument("--work", default="/tmp/sela_side_by_side")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "experiments/results"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hc", type=int, default=2)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--per_class", type=int, default=1000)
    parser.add_argument("--test_per_class", type=int, default=200)
    parser.add_argument("--sides", default="official,dcjax")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--subset", default="", help=argparse.SUPPRESS)
    parser.add_argument("--exp", default="", help=argparse.SUPPRESS)
    parser.add_argument("--record", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        official_child(args)
        return
    os.makedirs(args.work, exist_ok=True)
    args.subset = make_subset(
        args.cifar, os.path.join(args.work, "subset"), args.per_class, args.test_per_class
    )
    ledger = os.path.join(args.work, "runs.jsonl")
    done = []
    if os.path.exists(ledger):
        with open(ledger) as f:
            done = [json.loads(line) for line in f if line.strip()]
    runners = {"official": official_run, "dcjax": dcjax_run}
    for seed in (int(s) for s in args.seeds.split(",")):
        for side in args.sides.split(","):
            if any(r["side"] == side and r["seed"] == seed for r in done):
                continue
            row = runners[side](args, seed)
            done.append(row)
            with open(ledger, "a") as f:
                f.write(json.dumps(row) + "\n")
    from dcjax.training.summary import machine_line, write_table

    header = [
        "# SeLa beside the official self-label CIFAR code (CPU budget)",
        "",
        "Command: `python bench/parity/sela_side_by_side.py --official=<self-label checkout> "
        f"--cifar=<CIFAR-10 JPEG folder> --epochs={args.epochs} --seeds={args.seeds}`",
        f"Official: {OFFICIAL_REPO} {OFFICIAL_COMMIT[:7]} (`cifar.py`, patched in memory: "
        "bench/parity/sela_side_by_side.py); dcjax: `configs/sela.py:cifar10_official,cpu`.",
        machine_line(),
        f"Both: {args.per_class} x 10 training and {args.test_per_class} x 10 test JPEGs, "
        f"{SIZE} px, {args.hc} heads x K={args.k}, {args.epochs} epochs, a label step every "
        "epoch (one head each), batch 128, lr 0.03, wd 5e-4; mean +- std over seeds.",
    ]
    write_table(args.out, "sela_vs_official_cpu", table(done, header), done)


if __name__ == "__main__":
    main()
