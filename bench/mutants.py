"""Curated mutants the test suite must catch: each a one-line bug of a real failure mode.

    python bench/mutants.py                 # every mutant, one by one (tens of minutes on 2 cores)
    python bench/mutants.py --only=odc_loss_cut,ascent
    python bench/mutants.py --list

For each mutant the script copies the working tree (tracked and untracked, not ignored files) to a
scratch folder, replaces one exact line fragment in one file (it must occur exactly once), and runs
the tests named for that mutant there, single-process (``-n 0``) with the scratch copy first
on ``sys.path``. The mutant is *caught* when pytest reports a failed test (exit code 1); a
collection or usage error (exit codes 2-4) is reported as *error*, never as caught, and a pass as
*missed*. Before the mutants, the same tests run on the unmutated copy and must pass: otherwise
the table would credit the suite with catching a bug that was already there.

The table goes to ``--out`` (``bench/results/mutants.md``) with each mutant's time and the total.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One bug: in ``path`` (repo-relative) ``old`` becomes ``new``; ``tests`` must catch it."""

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


_VECTORS = "tests/training/test_vectors_runs.py::test_vectors_smoke_run_of_every_method"
_STEP = (
    "tests/training/test_step.py::test_two_steps_are_torch_sgd_with_coupled_decay_on_the_schedule"
)
_RECIPES = "tests/data/test_augment_recipes.py"
_SAVE_FAILURE = (
    '    except OSError as error:\n        raise UserError(\n            f"could not save'
)

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "odc_loss_cut",
        "ODC's loss cut from the graph (stop_gradient on the logits): ODC and CODC never learn",
        "dcjax/methods/odc.py",
        '    logits = outputs["logits"]\n    heads = ',
        '    logits = jax.lax.stop_gradient(outputs["logits"])\n    heads = ',
        (f"{_VECTORS}[odc]",),
    ),
    Mutant(
        "sela_loss_cut",
        "SeLa's loss cut from the graph",
        "dcjax/methods/sela.py",
        '    logits = outputs["logits"]\n    labels = method_state.labels',
        '    logits = jax.lax.stop_gradient(outputs["logits"])\n    labels = method_state.labels',
        (f"{_VECTORS}[sela]",),
    ),
    Mutant(
        "ascent",
        "the train step applies -updates (gradient ascent)",
        "dcjax/training/step.py",
        "optax.apply_updates(state.params[group], updates)",
        "optax.apply_updates(state.params[group], jax.tree.map(lambda u: -u, updates))",
        (_STEP,),
    ),
    Mutant(
        "labels_shuffled",
        "DeepCluster's pseudo-labels paired with the wrong examples (rolled by one in the batch)",
        "dcjax/methods/deepcluster.py",
        "    labels = method_state.pseudo_labels[indices]\n",
        "    labels = jnp.roll(method_state.pseudo_labels[indices], 1)\n",
        (f"{_VECTORS}[deepcluster]",),
    ),
    Mutant(
        "head_kept",
        "DeepCluster's recluster keeps the old head instead of a new random one",
        "dcjax/methods/deepcluster.py",
        'params = {**state.params, "head": head["params"]}',
        "params = {**state.params}",
        (
            "tests/methods/test_deepcluster.py::test_recluster_reinitialises_the_head_and_its_optimizer",
        ),
    ),
    Mutant(
        "head_opt_kept",
        "DeepCluster's recluster keeps the old head's optimiser state (momentum buffers)",
        "dcjax/methods/deepcluster.py",
        'opt_state = {**state.opt_state, "head": ctx.optimizers["head"].init(head["params"])}',
        "opt_state = {**state.opt_state}",
        (
            "tests/methods/test_deepcluster.py::test_recluster_reinitialises_the_head_and_its_optimizer",
        ),
    ),
    Mutant(
        "kmeans_key_fixed",
        "DeepCluster's k-means key is the same every cycle",
        "dcjax/methods/deepcluster.py",
        "jax.random.split(jax.random.fold_in(state.rng, cycle))",
        "jax.random.split(jax.random.fold_in(state.rng, 0))",
        ("tests/methods/test_deepcluster.py::test_each_cycle_draws_its_own_kmeans_key",),
    ),
    Mutant(
        "kmeans_no_iterations",
        "k-means returns its initial centroids (no Lloyd iteration runs)",
        "dcjax/clustering/kmeans.py",
        "return (it < plan.num_iters) & ~done",
        "return (it < 0) & ~done",
        ("tests/clustering/test_kmeans.py",),
    ),
    Mutant(
        "sinkhorn_skewed_marginals",
        "Sinkhorn's default cluster marginals not uniform (equipartition broken)",
        "dcjax/clustering/sinkhorn.py",
        "r = jnp.full((k,), 1.0 / k, dtype) if cluster_marginals is None",
        "r = jnp.linspace(0.5, 1.5, k, dtype=dtype) / k if cluster_marginals is None",
        ("tests/clustering/test_sinkhorn.py",),
    ),
    Mutant(
        "odc_memory_frozen",
        "ODC's memory never takes the new features",
        "dcjax/clustering/online.py",
        "    return memory.at[indices].set(rows), rows",
        "    return memory, rows",
        ("tests/clustering/test_online.py", "tests/parity/test_odc.py"),
    ),
    Mutant(
        "label_pass_eval_bn",
        "the train-mode label pass runs batch norm in eval mode",
        "dcjax/training/step.py",
        '                train=True,\n                mutable=["batch_stats"],',
        '                train=False,\n                mutable=["batch_stats"],',
        ("tests/parity/test_deepcluster_v2.py", "tests/methods/test_sela.py"),
    ),
    Mutant(
        "odc_jitter_off",
        "no colour jitter in ODC's augmentation",
        "dcjax/data/augment.py",
        "    image = color_jitter(key_jitter, image, **_ODC_JITTER)\n",
        "",
        (_RECIPES,),
    ),
    Mutant(
        "swav_jitter_p0",
        "SwAV's colour jitter never applied",
        "dcjax/data/augment.py",
        "_SWAV_JITTER_P = 0.8",
        "_SWAV_JITTER_P = 0.0",
        (_RECIPES,),
    ),
    Mutant(
        "deepdive_never_mirrors",
        "the deep-dive probe never draws the mirrored view",
        "dcjax/evaluation/deepdive_probe.py",
        "    views = rng.integers(0, num_views, size=(epochs, size)).astype(np.int32)",
        "    views = 0 * rng.integers(0, num_views, size=(epochs, size)).astype(np.int32)",
        ("tests/evaluation/test_deepdive_probe.py",),
    ),
    Mutant(
        "save_error_swallowed",
        "a failing checkpoint save is ignored",
        "dcjax/training/checkpoint.py",
        _SAVE_FAILURE,
        _SAVE_FAILURE.replace("error:\n", "error:\n        return\n"),
        ("tests/training/test_save_failures.py",),
    ),
)


def tree_files(root: str) -> list[str]:
    """Repo-relative paths of the working tree's tracked and untracked, not ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [p for p in listed.split("\0") if p and os.path.isfile(os.path.join(root, p))]


def copy_tree(root: str, dest: str) -> None:
    """Copies the working tree's files (``tree_files``) from ``root`` into ``dest``."""
    for rel in tree_files(root):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)


def apply(mutant: Mutant, root: str) -> None:
    """Writes ``mutant`` into the copy at ``root``; raises ValueError unless ``old`` occurs once."""
    path = os.path.join(root, mutant.path)
    with open(path) as f:
        text = f.read()
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name}: {mutant.old!r} is {count} times in {mutant.path}")
    with open(path, "w") as f:
        f.write(text.replace(mutant.old, mutant.new))


def run_tests(root: str, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    """pytest on ``tests`` inside ``root``; (exit code, its output, seconds)."""
    env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-q"]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, "-x", *tests],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, output = -1, "timed out"
    return code, output, time.perf_counter() - start


def verdict(code: int) -> str:
    """pytest's exit code as the table's word for a mutant."""
    return {0: "missed", 1: "caught", -1: "timeout"}.get(code, f"error ({code})")


def failing_test(output: str) -> str:
    """The first ``FAILED <node id>`` in pytest's short summary, or ''."""
    for line in output.splitlines():
        if line.startswith("FAILED "):
            return line.split()[1]
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench/results/mutants.md"))
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.path}: {m.what}")
        return
    rows, total = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcjax-mutants-") as scratch:
        clean = os.path.join(scratch, "clean")
        copy_tree(REPO_ROOT, clean)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, output, seconds = run_tests(clean, tests, args.timeout)
        print(f"unmutated: exit {code} in {seconds:.0f} s", flush=True)
        if code != 0:
            raise SystemExit(f"the named tests fail without a mutant:\n{output[-3000:]}")
        for m in chosen:
            root = os.path.join(scratch, m.name)
            shutil.copytree(clean, root)
            apply(m, root)
            code, output, seconds = run_tests(root, m.tests, args.timeout)
            rows.append((m, verdict(code), failing_test(output), seconds))
            print(f"{m.name}: {rows[-1][1]} in {seconds:.0f} s {rows[-1][2]}", flush=True)
            shutil.rmtree(root)
    total = time.perf_counter() - total
    lines = [
        "# Mutants the suite must catch",
        "",
        f"`python bench/mutants.py` at `{_commit()}`: {len(rows)} mutants, "
        f"{sum(r[1] == 'caught' for r in rows)} caught, {total / 60:.1f} min in all "
        "(2-core CPU, each mutant's tests single-process).",
        "",
        "| mutant | file | bug | verdict | first failing test | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m, word, test, seconds in rows:
        lines.append(f"| `{m.name}` | `{m.path}` | {m.what} | {word} | `{test}` | {seconds:.0f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(r[1] != "caught" for r in rows):
        raise SystemExit(1)


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True).stdout.decode()

    return git("rev-parse", "--short", "HEAD").strip() + (
        "+changes" if git("status", "--porcelain").strip() else ""
    )


if __name__ == "__main__":
    main()
