"""OpenSelfSup's linear evaluation of a frozen network (``eval.protocol = "openselfsup"``).

What open-mmlab/OpenSelfSup (1db69ec) runs for its "ImageNet (Last)" figures, ODC's 53.42 %
among them (``docs/MODEL_ZOO.md:62,73``): ``benchmarks/dist_train_linear.sh`` with
``configs/benchmarks/linear_classification/imagenet/r50_last.py`` on 8 GPUs, through
``tools/train.py``, ``apis/train.py`` and mmcv 1.0.3's runner:

- the backbone: the pre-trained ResNet-50 with ``frozen_stages=4`` (``r50_last.py:13``): every
  stage kept in eval mode (batch-norm running statistics) and without gradients, also after each
  ``train()`` (``models/backbones/resnet.py:373-384,422-424``); the layer probed is its last
  stage's map (``out_indices=[4]``, ``r50_last.py:11``; 2048 x 7 x 7 at 224 px);
- the head, ``ClsHead(with_avg_pool=True, in_channels=2048)`` (``r50_last.py:14-16``): the map
  average-pooled over all its positions, flattened, one ``nn.Linear`` (``models/heads/
  cls_head.py:24-26,47-52``), no batch norm; initialised by ``init_weights()`` with its defaults
  (``models/classification.py:47``): weight from N(0, 0.01^2), bias 0 (``cls_head.py:28-34``);
  the loss the batch's mean cross-entropy (``cls_head.py:22,58``);
- ``SGD(lr=30, momentum=0.9, weight_decay=0)`` (``r50_last.py:71``) over all the model's
  parameters, no per-parameter options (``apis/train.py:140-142``): the frozen ones have no
  gradient, so only the head moves; no Nesterov, dampening 0; one step per batch
  (``hooks/optimizer_hook.py:20-31``);
- the rate, set before each 0-based epoch e by mmcv's ``StepLrUpdaterHook`` (``lr_config =
  dict(policy='step', step=[60, 80])``, ``r50_last.py:73``; gamma 0.1 by default):
  ``30 x 0.1^(number of steps <= e)``, i.e. 30, then 3 from epoch 60, 0.3 from epoch 80;
  100 epochs (``r50_last.py:76``);
- batches of 32 per GPU x 8 GPUs = 256 (``r50_last.py:42``, ``dist_train_linear.sh:9``), a fresh
  permutation each epoch padded to a multiple of 8 and split between the GPUs, the last batch
  partial (``datasets/loader/sampler.py:33-52``; ``apis/train.py:182-184``: no replacement,
  no ``drop_last``);
- training view: ``RandomResizedCrop(224)`` (scale 0.08-1, ratio 3/4-4/3) + horizontal flip;
  test view: ``Resize(256)`` + ``CenterCrop(224)``; both normalised by the ImageNet mean and
  std (0.229, 0.224, 0.225) (``r50_last.py:27-40``);
- ``ValidateHook(initial=True, interval=1, eval_param=dict(topk=(1, 5)))`` (``r50_last.py:
  58-69``): the whole validation split scored before training and after every epoch
  (``hooks/validate_hook.py:54-61``), top-1 and top-5 in % (``datasets/classification.py:
  25-44``); the figure reported is the best top-1 among all epochs (``docs/MODEL_ZOO.md:62``).

This module holds the protocol's settings and its rate per epoch; the rest (the pooling, the
initialisation, the centre crop's scores, the settings it shares) is
``dcjax.evaluation.pooled_probe``'s, shared with SwAV's protocol, and
``dcjax.training.openselfsup_eval`` runs it over a run's image banks.

Differences left:

- crops from dcjax's image banks (each image fitted to an S x S square): as SwAV's protocol
  (``dcjax.evaluation.swav_probe``): the training crop is drawn on that square, the centre crop
  is the official box scaled by S / 256, one pixel apart for a longer side L with
  L - 256 = 3 mod 4, and resampled bilinearly without PIL's antialiasing when S != 256;
- the normalisation is the run's (``config.input``);
- the official GPUs each take an equal share of the train split padded by repeating up to 7
  images, their gradients averaged; dcjax cuts one permutation of the whole split into batches
  of 256, the last one partial;
- OpenSelfSup's other ImageNet protocol, "ImageNet (Multi)" (``r50_multihead.py``: batch-normed
  heads on the five stages, SGD 0.01 with Nesterov, 90 epochs, the last epoch's top-1; ODC's
  57.70 % at feat5), is not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dcjax.core.errors import ConfigError
from dcjax.evaluation.pooled_probe import PooledProbeConfig, is_int
from dcjax.evaluation.probe_kernels import LayerScores

__all__ = ["OpenselfsupProbeConfig", "OpenselfsupProbeResult", "learning_rate"]


@dataclasses.dataclass(frozen=True)
class OpenselfsupProbeConfig(PooledProbeConfig):
    """The protocol's settings (``config.eval.openselfsup``), the official values by default:
    those of ``PooledProbeConfig`` (whose docstring says what they mean), and

    Attributes:
      lr_drop_epochs: the 0-based epochs from which the rate is multiplied by
        ``lr_drop_factor`` once more (mmcv's ``step``), strictly increasing.
      lr_drop_factor: that factor (mmcv's ``gamma``), in (0, 1].
      test_initial: also score the test split before training (epoch 0 of the figures).

    Raises:
      ConfigError: naming the ``config.eval.openselfsup`` field that is out of range.
    """

    field: ClassVar[str] = "config.eval.openselfsup"

    learning_rate: float = 30.0
    weight_decay: float = 0.0
    lr_drop_epochs: tuple[int, ...] = (60, 80)
    lr_drop_factor: float = 0.1
    test_initial: bool = True

    def __post_init__(self):
        super().__post_init__()
        f, drops = self.field, self.lr_drop_epochs
        if not isinstance(drops, tuple | list) or not all(is_int(d, 1) for d in drops):
            raise ConfigError(f"{f}.lr_drop_epochs={drops!r} must be a sequence of ints >= 1")
        if list(drops) != sorted(set(drops)):
            raise ConfigError(f"{f}.lr_drop_epochs={drops!r} must be strictly increasing")
        object.__setattr__(self, "lr_drop_epochs", tuple(int(d) for d in drops))
        if not 0 < self.lr_drop_factor <= 1:
            raise ConfigError(f"{f}.lr_drop_factor={self.lr_drop_factor} must be in (0, 1]")
        if not isinstance(self.test_initial, bool):
            raise ConfigError(f"{f}.test_initial={self.test_initial!r} must be a bool")


class OpenselfsupProbeResult(LayerScores):
    """Scores per tested epoch (``LayerScores``; epoch 0: the initial weights, when tested);
    the test loss is the centre crop's."""

    def figures(self) -> dict[str, float]:
        """``openselfsup_top1/<layer>`` and ``openselfsup_top5/<layer>`` (the last epoch), and
        ``openselfsup_best_top1/<layer>`` (the best tested epoch: the figure OpenSelfSup
        reports for its "ImageNet (Last)" protocol)."""
        return self.layer_figures("openselfsup")


def learning_rate(epoch: int, config: OpenselfsupProbeConfig) -> float:
    """The rate of 0-based ``epoch``, constant within it: ``learning_rate`` times
    ``lr_drop_factor`` to the number of ``lr_drop_epochs`` <= ``epoch``."""
    drops = sum(epoch >= d for d in config.lr_drop_epochs)
    return config.learning_rate * config.lr_drop_factor**drops
