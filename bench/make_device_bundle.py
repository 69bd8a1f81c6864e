"""What ``bench/device_run.sh`` needs on the GPU machine, made here in git-ignored folders.

  python bench/make_device_bundle.py                         # wheels + all 60,000 CIFAR-10 JPEGs
  python bench/make_device_bundle.py --train_per_class=2500  # a smaller train split
  python bench/make_device_bundle.py --extract=/tmp/cifar10 --train_per_class=30 --test_per_class=15

- ``.whl/``: wheels (Python 3.12, manylinux x86-64, no dependencies) of what the GPU image lacks:
  ``WHEELS`` below. Their ``Requires-Dist`` are checked against ``ON_GPU_IMAGE`` (from
  ``/work/.library/device/KINDS.md``, "Python packages already there").
- ``.device_data/cifar10-jpg.tar.gz``: the CIFAR-10 JPEG zip (``--cifar_zip``, else
  ``$DCJAX_CIFAR10_ZIP``, else ``../shared/datasets/cifar10-jpg.zip``) repacked as one tar.gz of
  ``{train,test}/<class>/NNNN.jpg``: every 32x32 JPEG repeats the same ~600 bytes of tables, which a
  zip compresses file by file but a tar.gz across files, so all 60,000 images take ~19 MiB
  instead of 59. ``cifar10-jpg.json`` beside it counts the images.
- Prints what a device call carries (tracked and untracked-not-ignored files plus these two
  folders) against the 64 MiB limit.

``--extract=DEST`` unpacks the tar.gz (on the GPU machine; optionally the first N images of each
class per split) and makes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_DIR = os.path.join(REPO, ".whl")
DATA_DIR = os.path.join(REPO, ".device_data")
DATA_TAR = os.path.join(DATA_DIR, "cifar10-jpg.tar.gz")
CARRY_LIMIT_MIB = 64.0
CARRY_TARGET_MIB = 60.0

# pyproject.toml's dependencies that the GPU image lacks (tensorflow-datasets is only imported by
# the tfds source, which the device run does not use), and ott-jax's jaxopt.
WHEELS = (
    "ott-jax==0.6.0",
    "jaxopt==0.8.5",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorboardX==2.6.5",
)
# The packages these wheels need that the GPU image has (KINDS.md's list).
ON_GPU_IMAGE = {
    "absl-py",
    "etils",
    "flax",
    "jax",
    "jaxlib",
    "lineax",
    "numpy",
    "optax",
    "packaging",
    "protobuf",
    "pyyaml",
    "scipy",
    "typing-extensions",
    "wrapt",
}
PIP_DOWNLOAD = [
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(
        arg
        for platform in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux1_x86_64",
        )
        for arg in ("--platform", platform)
    ),
    "-d",
    WHEEL_DIR,
]
_MEMBER = re.compile(r"^(?:.*/)?(train|test)/([^/]+)/([^/]+\.jpe?g)$", re.IGNORECASE)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name(path: str) -> str:
    return _norm(os.path.basename(path).split("-")[0])


def wheels() -> list[str]:
    """Downloads the missing ``WHEELS`` into ``.whl/``; checks one version each and their needs."""
    os.makedirs(WHEEL_DIR, exist_ok=True)
    have = {_wheel_name(f) for f in os.listdir(WHEEL_DIR) if f.endswith(".whl")}
    missing = [spec for spec in WHEELS if _norm(spec.split("==")[0]) not in have]
    if missing:
        subprocess.run([sys.executable, *PIP_DOWNLOAD, *missing], check=True)
    files = sorted(os.path.join(WHEEL_DIR, f) for f in os.listdir(WHEEL_DIR) if f.endswith(".whl"))
    names = [_wheel_name(f) for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f".whl/ holds several versions of {duplicates}: keep one of each")
    carried = set(names)
    for path in files:
        with zipfile.ZipFile(path) as whl:
            meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            lines = whl.read(meta).decode().splitlines()
        needs = []
        for line in lines:
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                requirement = line.split(":", 1)[1].strip()
                if "python_version" in requirement and "<" in requirement:
                    continue  # only for Pythons older than the image's 3.12
                needs.append(_norm(re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0]))
        absent = [n for n in needs if n not in ON_GPU_IMAGE | carried]
        warning = f"; NOT on the GPU image: {absent}" if absent else ""
        print(
            f"  {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.2f} MiB) needs "
            f"{', '.join(needs) or 'nothing'}{warning}"
        )
    return files


def _cifar_zip(path: str) -> str:
    candidates = [
        path,
        os.environ.get("DCJAX_CIFAR10_ZIP", ""),
        os.path.join(os.path.dirname(REPO), "shared", "datasets", "cifar10-jpg.zip"),
    ]
    found = next((c for c in candidates if c and os.path.isfile(c)), None)
    if found is None:
        raise SystemExit("CIFAR-10 zip not found: pass --cifar_zip or set DCJAX_CIFAR10_ZIP")
    return found


def _keep(counts: dict, split: str, cls: str, limits: dict[str, int]) -> bool:
    """Whether the next image of (split, cls) is within its per-class limit (0 = all)."""
    counts[(split, cls)] = counts.get((split, cls), 0) + 1
    return not limits[split] or counts[(split, cls)] <= limits[split]


def pack(zip_path: str, limits: dict[str, int]) -> dict:
    """Repacks the zip's ``{train,test}/<class>/*.jpg`` (first N per class, sorted) as a tar.gz
    with fixed times and owners, so the same input gives the same bytes."""
    os.makedirs(DATA_DIR, exist_ok=True)
    counts: dict[tuple[str, str], int] = {}
    kept = {"train": 0, "test": 0}
    with zipfile.ZipFile(zip_path) as archive:
        members = sorted(
            (match.groups(), info)
            for info in archive.infolist()
            if (match := _MEMBER.match(info.filename))
        )
        with open(DATA_TAR, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for (split, cls, name), info in members:
                        if not _keep(counts, split, cls, limits):
                            continue
                        data = archive.read(info)
                        entry = tarfile.TarInfo(f"{split}/{cls}/{name}")
                        entry.size, entry.mode, entry.mtime = len(data), 0o644, 0
                        tar.addfile(entry, io.BytesIO(data))
                        kept[split] += 1
    manifest = {
        "source": os.path.basename(zip_path),
        "train_images": kept["train"],
        "test_images": kept["test"],
        "classes": sorted({cls for (_, cls) in counts}),
        "train_per_class_limit": limits["train"],
        "test_per_class_limit": limits["test"],
        "bytes": os.path.getsize(DATA_TAR),
    }
    with open(os.path.join(DATA_DIR, "cifar10-jpg.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def extract(dest: str, limits: dict[str, int], tar_path: str = DATA_TAR) -> dict[str, int]:
    """Unpacks ``tar_path`` into ``dest`` (first N images per class and split); the counts."""
    counts: dict[tuple[str, str], int] = {}
    kept = {"train": 0, "test": 0}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            match = _MEMBER.match(member.name)
            if not member.isfile() or not match:
                continue
            split, cls, _ = match.groups()
            if _keep(counts, split, cls, limits):
                tar.extract(member, dest, filter="data")
                kept[split] += 1
    return kept


def carry_mib(extra: list[str]) -> float:
    """MiB a device call carries: tracked and untracked-not-ignored files, plus ``extra``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [os.path.join(REPO, p.decode()) for p in listed if p]
    for folder in extra:
        for root, _, names in os.walk(folder):
            paths += [os.path.join(root, n) for n in names]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar_zip", default="", help="CIFAR-10 JPEG zip (default: see above)")
    parser.add_argument("--train_per_class", type=int, default=0, help="0 = all 5,000")
    parser.add_argument("--test_per_class", type=int, default=0, help="0 = all 1,000")
    parser.add_argument("--no_data", action="store_true", help="wheels only")
    parser.add_argument("--extract", default="", help="unpack the tar.gz here and stop")
    args = parser.parse_args()
    limits = {"train": args.train_per_class, "test": args.test_per_class}
    if args.extract:
        kept = extract(args.extract, limits)
        print(f"extracted {kept['train']} train and {kept['test']} test images to {args.extract}")
        return
    print("wheels in .whl/:")
    files = wheels()
    print(f"  {sum(os.path.getsize(f) for f in files) / 2**20:.2f} MiB in {len(files)} wheels")
    if not args.no_data:
        manifest = pack(_cifar_zip(args.cifar_zip), limits)
        print(
            f"{DATA_TAR}: {manifest['train_images']} train + {manifest['test_images']} test "
            f"images, {manifest['bytes'] / 2**20:.2f} MiB"
        )
    total = carry_mib([WHEEL_DIR, DATA_DIR])
    print(f"a device call carrying .whl and .device_data sends {total:.1f} MiB (limit 64)")
    if total > CARRY_TARGET_MIB:
        print(f"WARNING: above {CARRY_TARGET_MIB:g} MiB: pass --train_per_class to carry less")
        if total > CARRY_LIMIT_MIB:
            sys.exit(1)


if __name__ == "__main__":
    main()
