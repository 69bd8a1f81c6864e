"""DeepCluster's linear protocol (eval_linear.py) against NumPy float64 replays of its rules.

The official numbers written here come from facebookresearch/deepcluster 2d1927e:
``eval_linear.py`` (RegLog, validate, the transforms), ``eval_linear.sh`` and ``util.py``.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dcjax.core.errors import ConfigError
from dcjax.evaluation import deepcluster_probe as dc
from dcjax.models.imagenet_nets import AlexNet
from dcjax.training import checkpoint, loop
from dcjax.training import deepcluster_eval as dc_eval
from dcjax.training.setup import build_run, check_config
from tests.helpers import (
    ONE_COLOUR_MEAN,
    ONE_COLOUR_STD,
    REPO,
    assert_matches_replay,
    load_config,
    run_on_one_colour_images,
)
from tests.references import ce_grads, pool_side, softmax, torch_sgd

# ------------------------------------------------------------------------- NumPy references


def _official_lr(lr0, wd, t):
    """util.learning_rate_decay."""
    return lr0 / np.sqrt(1 + lr0 * wd * t)


# -------------------------------------------------------------------------- optimiser, schedule


def test_sgd_step_and_schedule_equal_torchs_rule_in_float64(rng):
    dims, c, b = {"probe1": 37, "probe4": 11}, 5, 13
    lr0, momentum, wd, t0 = 0.01, 0.9, 3e-2, 2000  # a decay large enough to be seen
    params = dc.initial_params(7, dims, c)
    ref = {x: {k: v.astype(np.float64) for k, v in p.items()} for x, p in params.items()}
    ref_state = {x: {} for x in dims}
    buf = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def step(params, buf, features, labels, mask, t):
        grads, losses = jax.grad(dc.probe_loss, has_aux=True)(params, features, labels, mask)
        lr = dc.learning_rate(lr0, wd, t)
        return (*dc.sgd_update(params, buf, grads, lr, momentum=momentum, weight_decay=wd), losses)

    for i in range(4):
        feats = {x: rng.normal(size=(b, d)).astype(np.float32) for x, d in dims.items()}
        labels = rng.integers(0, c, b)
        mask = np.ones(b, bool)
        if i == 3:
            mask[9:] = False  # the epoch's last, partial batch: padding rows weigh nothing
            for x in dims:
                feats[x][9:] = 1e3
        params, buf, losses = step(params, buf, feats, labels, mask, t0 + i)
        for x in dims:
            rows = feats[x][mask].astype(np.float64)
            loss, grads = ce_grads(rows, labels[mask], ref[x]["kernel"], ref[x]["bias"])
            torch_sgd(ref[x], ref_state[x], grads, _official_lr(lr0, wd, t0 + i), momentum, wd)
            assert float(losses[x]) == pytest.approx(loss, rel=1e-5)
            for k in ("kernel", "bias"):
                np.testing.assert_allclose(params[x][k], ref[x][k], rtol=1e-5, atol=1e-7)
    # The schedule itself, and the first global step at lr0.
    t = np.array([0, 1, 450_449])
    np.testing.assert_allclose(dc.learning_rate(0.01, 1e-4, t), _official_lr(0.01, 1e-4, t))


def test_defaults_are_eval_linear_sh_and_argparse():
    cfg = dc.DeepclusterProbeConfig()
    # eval_linear.sh: --lr 0.01 --wd -7 --tencrops; argparse: 90 epochs, batch 256,
    # momentum 0.9; validation batches of batch_size / 2; Resize 256, crops of 224.
    assert (cfg.learning_rate, cfg.weight_decay, cfg.tencrops) == (0.01, 1e-7, True)
    assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.test_batch_size) == (90, 256, 0.9, 128)
    assert (cfg.resize, cfg.crop, cfg.test_every_epochs) == (256, 224, 1)
    assert cfg.layers == ("probe1", "probe2", "probe3", "probe4", "probe5")
    params = dc.initial_params(0, {"probe1": 9600}, 3)["probe1"]
    assert np.abs(params["kernel"]).max() <= 1 / np.sqrt(9600)  # nn.Linear's default bound


# ------------------------------------------------------------------------------------ pooling

# eval_linear.py's RegLog: (AvgPool2d kernel, stride, padding) and the Linear's width s per conv.
_REGLOG = {1: (6, 6, 3, 9600), 2: (4, 4, 0, 9216), 3: (3, 3, 1, 9600), 4: (3, 3, 1, 9600)}
_REGLOG[5] = (2, 2, 0, 9216)
# models/alexnet.py CFG['2012']: (filters, kernel, stride, pad), 'M' = MaxPool2d(3, stride 2).
_ALEXNET_CFG = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1)]
_ALEXNET_CFG += [(256, 3, 1, 1), "M"]


def _official_conv_maps(size):
    """(channels, side) of the output of each ReLU (forward(x, model, conv) returns it)."""
    maps, n = [], size
    for layer in _ALEXNET_CFG:
        if layer == "M":
            n = pool_side(n, 3, 2, 0)
        else:
            n = pool_side(n, *layer[1:])
            maps.append((layer[0], n))
    return maps


def _official_avg_pool(x, kernel, stride, pad):
    """AvgPool2d(count_include_pad=True) of (H, W, C), as a loop over windows."""
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    side = pool_side(x.shape[0], kernel, stride, pad)
    out = np.empty((side, side, x.shape[2]))
    for i in range(side):
        for j in range(side):
            window = padded[i * stride : i * stride + kernel, j * stride : j * stride + kernel]
            out[i, j] = window.sum((0, 1)) / kernel**2
    return out


def test_probe_widths_and_values_are_reglogs_pooling_of_each_relu():
    maps = _official_conv_maps(224)
    widths = [ch * pool_side(n, *_REGLOG[k][:3]) ** 2 for k, (ch, n) in enumerate(maps, 1)]
    assert widths == [_REGLOG[k][3] for k in range(1, 6)] == [9600, 9216, 9600, 9600, 9216]
    net = AlexNet(hidden_dim=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 224, 224, 2))
    variables = jax.jit(lambda k: net.init(k, x, train=False))(jax.random.PRNGKey(1))
    out = jax.jit(lambda v: net.apply(v, x, train=False))(variables)
    for k, (ch, n) in enumerate(maps, 1):
        relu = np.asarray(out[f"relu{k}"][0], np.float64)
        assert relu.shape == (n, n, ch)
        expected = _official_avg_pool(relu, *_REGLOG[k][:3]).reshape(-1)
        np.testing.assert_allclose(out[f"probe{k}"][0], expected, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- crops, scores


def _coordinate_image(side):
    """(side, side, 3) float: channel 0 the row, 1 the column, 2 noise."""
    rows, cols = np.mgrid[:side, :side].astype(np.float32)
    noise = np.random.default_rng(0).random((side, side)).astype(np.float32)
    return np.stack([rows, cols, noise], -1)


def _torchvision_ten_crop(img, size):
    """TenCrop(size) as torchvision defines it: five_crop(img) + five_crop(hflip(img))."""

    def five(im):
        h, w = im.shape[:2]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return [
            im[:size, :size],
            im[:size, w - size :],
            im[h - size :, :size],
            im[h - size :, w - size :],
            im[top : top + size, left : left + size],
        ]

    return np.stack(five(img) + five(img[:, ::-1]))


def test_ten_crops_are_torchvisions_on_the_resize_square():
    cfg = dc.DeepclusterProbeConfig(resize=40, crop=27)  # odd margin: the centre rounds
    image = _coordinate_image(40)  # a bank image already at the resize side: exact pixels
    views = jax.jit(lambda x: dc_eval.test_views(x, cfg, (27, 27)))(image)
    np.testing.assert_allclose(views, _torchvision_ten_crop(image, 27), atol=1e-4)
    one = dc.DeepclusterProbeConfig(resize=40, crop=27, tencrops=False)
    centre = jax.jit(lambda x: dc_eval.test_views(x, one, (27, 27)))(image)
    np.testing.assert_allclose(centre, _torchvision_ten_crop(image, 27)[4:5], atol=1e-4)
    # A bank image at another side holds the same square: its crops are the rescaled boxes.
    small = jax.jit(lambda x: dc_eval.test_views(x, cfg, (27, 27)))(image[::2, ::2])
    assert small.shape == (10, 27, 27, 3)
    np.testing.assert_allclose(small[0, 0, 0, :2], [0.0, 0.0], atol=0.5)
    np.testing.assert_allclose(small[3, -1, -1, :2], [38.0, 38.0], atol=1.0)


def test_training_crops_take_every_integer_offset_and_flip():
    cfg = dc.DeepclusterProbeConfig(resize=20, crop=16)
    image = jnp.asarray(_coordinate_image(20))
    keys = jax.random.split(jax.random.PRNGKey(0), 300)
    views = np.asarray(
        jax.jit(jax.vmap(lambda k: dc_eval.train_view(k, image, cfg, (16, 16))))(keys)
    )
    seen, flips = set(), 0
    for view in views:
        flipped = view[0, 0, 1] > view[0, -1, 1]
        flips += flipped
        plain = view[:, ::-1] if flipped else view
        top, left = int(round(plain[0, 0, 0])), int(round(plain[0, 0, 1]))
        np.testing.assert_allclose(plain, image[top : top + 16, left : left + 16], atol=1e-4)
        seen.add((top, left))
    tops, lefts = {t for t, _ in seen}, {x for _, x in seen}
    assert tops == lefts == set(range(5))  # randint(0, 20 - 16 + 1)
    assert 100 < flips < 200


def test_ten_crop_scores_average_the_softmax_and_score_the_centre_crops_loss(rng):
    b, c = 23, 7
    logits = rng.normal(size=(b, 10, c)).astype(np.float32) * 3
    labels = rng.integers(0, c, b)
    scores = jax.jit(dc.view_scores)
    top1, top5, loss = scores(logits, labels)
    probs = softmax(logits.astype(np.float64)).mean(1)
    order = np.argsort(-probs, axis=1)
    ranked = np.take_along_axis(probs, order, axis=1)
    # Rows whose float64 ranking float32 cannot settle (a gap below 1e-5 at the cut) are left
    # out; fresh inputs leave nearly all rows in.
    clear1, clear5 = ranked[:, 0] - ranked[:, 1] > 1e-5, ranked[:, 4] - ranked[:, 5] > 1e-5
    assert clear1.mean() > 0.8 and clear5.mean() > 0.8
    np.testing.assert_array_equal(np.asarray(top1)[clear1], (order[:, 0] == labels)[clear1])
    hit5 = (order[:, :5] == labels[:, None]).any(1)
    np.testing.assert_array_equal(np.asarray(top5)[clear5], hit5[clear5])
    centre = softmax(logits[:, 4].astype(np.float64))  # validate(): view ncrops / 2 - 1
    # float32 cross-entropy: about 2e-7 absolute where the loss is near 0.
    np.testing.assert_allclose(loss, -np.log(centre[np.arange(b), labels]), rtol=1e-5, atol=1e-6)
    # One view (CenterCrop): the logits themselves are scored.
    top1, _, loss = scores(logits[:, :1], labels)
    np.testing.assert_array_equal(top1, logits[:, 0].argmax(1) == labels)
    assert not scores(np.full((1, 1, 3), np.nan), np.zeros(1, int))[0][0]


# -------------------------------------------------------------------------- the whole protocol


def _toy_apply(variables, x):
    """A 'network' of two pooled layers whose features do not depend on the crop position for
    images of one colour: the mean colour, through a fixed map."""
    colour = x.mean(axis=(1, 2))
    return {"probe1": jnp.tanh(colour @ variables["w1"]), "probe2": colour @ variables["w2"]}


def test_protocol_equals_a_float64_replay_of_the_official_loop(rng):
    """One-colour images make every crop and flip the same view, so the whole run (epochs,
    global steps, partial batches, schedule, ten-crop scoring) can be replayed in NumPy."""
    n, m, c = 37, 19, 3
    variables = {"w1": rng.normal(size=(3, 5)), "w2": rng.normal(size=(3, 4))}
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    cfg = dc.DeepclusterProbeConfig(
        layers=("probe1", "probe2"), epochs=3, batch_size=8, test_batch_size=8,
        learning_rate=0.5, weight_decay=1e-2, resize=16, crop=12, test_every_epochs=2,
    )  # fmt: skip
    result, x, labels = run_on_one_colour_images(
        rng,
        lambda mesh: dc_eval.DeepclusterProbe(
            _toy_apply, cfg, ONE_COLOUR_MEAN, ONE_COLOUR_STD, (12, 12), mesh
        ),
        variables,
        n=n,
        m=m,
    )
    # The replay: the same initial weights and batch order (the module's documented draws).
    feats = {"probe1": np.tanh(x @ np.asarray(variables["w1"], np.float64))}
    feats["probe2"] = x @ np.asarray(variables["w2"], np.float64)
    params = dc.initial_params(5, {"probe1": 5, "probe2": 4}, c)
    params = {k: {p: v.astype(np.float64) for p, v in d.items()} for k, d in params.items()}
    state = {k: {} for k in params}
    order_rng = np.random.default_rng([5, 3])
    t, train_loss, tested = 0, {k: [] for k in params}, {k: [] for k in params}
    for epoch in range(1, 4):
        order, sums = order_rng.permutation(n), {k: 0.0 for k in params}
        for start in range(0, n, 8):  # DataLoader(shuffle=True), the last batch of 5
            rows = order[start : start + 8]
            lr = _official_lr(0.5, 1e-2, t)
            for k, p in params.items():
                loss, grads = ce_grads(feats[k][rows], labels[rows], p["kernel"], p["bias"])
                torch_sgd(p, state[k], grads, lr, 0.9, 1e-2)
                sums[k] += loss * len(rows)  # AverageMeter.update(loss, n)
            t += 1
        for k, p in params.items():
            train_loss[k].append(sums[k] / n)
            if epoch in (2, 3):
                probs = softmax(feats[k][n:] @ p["kernel"] + p["bias"])
                tested[k].append(
                    (
                        (probs.argmax(1) == labels[n:]).mean(),
                        -np.log(probs[np.arange(m), labels[n:]]).mean(),
                    )
                )
    assert_matches_replay(result, [2, 3], train_loss, tested, m)
    figures = result.figures()
    assert figures["deepcluster_top1/probe2"] == result.top1["probe2"][-1]
    assert figures["deepcluster_best_top1/probe1"] == max(result.top1["probe1"])


# --------------------------------------------------------------------------- config and the CLI


def test_bad_settings_and_backbones_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="config.eval.deepcluster.epochs"):
        dc.DeepclusterProbeConfig(epochs=0)
    with pytest.raises(ConfigError, match="resize=200 must be >= crop=224"):
        dc.DeepclusterProbeConfig(resize=200)
    with pytest.raises(ConfigError, match=r"unknown fields \['epoch'\]"):
        dc.DeepclusterProbeConfig.from_config({"epoch": 3})
    config = load_config("deepcluster", "smoke")  # digits on the small CNN: no probe1..5
    config.eval.protocol = "deepcluster"
    with pytest.raises(ConfigError, match="config.eval.protocol='deepcluster'.*'probe1'"):
        check_config(config)


def _folder(root, size):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c in ("n01", "n02"):
            os.makedirs(root / split / c)
            for i in range(count):
                pixels = rng.integers(0, 256, (size + 7, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")
    return str(root)


@pytest.mark.slow
def test_evaluate_command_reports_deepclusters_per_layer_figures(tmp_path):
    """``python -m dcjax.evaluate --config.eval.protocol=deepcluster`` on a workdir of the
    ``imagenet,smoke`` form (AlexNet + Sobel, 64 px to stay small): config.json and a
    checkpoint of the network as built (no training: the command is under test, not the run)."""
    config = load_config("deepcluster", "imagenet,smoke")
    config.data.update(path=_folder(tmp_path / "data", 64), cache_dir=str(tmp_path / "cache"))
    config.input.image_size = 64
    config.num_devices = 1
    config.eval.update(extra_probe_layers=(), probe_epochs=1)
    workdir = str(tmp_path / "run")
    built = build_run(config)
    loop.check_workdir_config(config, workdir)
    checkpoint.save(checkpoint.make_manager(workdir, 1), built.initial_state)
    out = str(tmp_path / "dc.json")
    args = [
        "--config.eval.protocol=deepcluster",
        "--config.eval.deepcluster.epochs=2",
        "--config.eval.deepcluster.batch_size=4",
        "--config.eval.deepcluster.test_batch_size=2",
        "--random_init=false",
        f"--out={out}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "dcjax.evaluate", f"--workdir={workdir}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DeepCluster's linear protocol" in done.stdout
    with open(out) as f:
        written = json.load(f)
    assert "random_init" not in written
    trained = written["trained"]
    for k in range(1, 6):
        for name in ("top1", "top5", "best_top1"):
            assert 0.0 <= trained[f"deepcluster_{name}/probe{k}"] <= 1.0
        assert trained[f"deepcluster_top5/probe{k}"] == 1.0  # 2 classes
        assert f"probe{k}" in done.stdout
    assert "probe_accuracy" in trained  # the dcjax probes and kNN still run beside it


def test_eval_overrides_reach_older_configs_and_only_eval():
    from dcjax.evaluate import apply_eval_overrides

    config = ml_collections.ConfigDict({"eval": {"protocol": "dcjax", "probe_layer": "x"}})
    apply_eval_overrides(config, {"eval.protocol": "deepcluster", "eval.deepcluster.epochs": 2})
    assert config.eval.protocol == "deepcluster" and config.eval.deepcluster.epochs == 2
    assert config.eval.deepcluster.crop == 224  # the defaults of a block the run predates
    with pytest.raises(ConfigError, match="overrides config.eval only"):
        apply_eval_overrides(config, {"method.num_clusters": 3})
