"""SwAV's linear evaluation of a frozen network (``eval.protocol = "swav"``).

What facebookresearch/swav (06b1b7c) does in ``eval_linear.py`` with the defaults of its
argparse (the README's command passes only the data and the weights), the protocol behind the
ImageNet linear figures of SwAV's paper and model zoo (DeepCluster-v2's among them):

- the trunk is frozen (never in the optimiser, run without gradients) and kept in eval mode
  (batch-norm running statistics); the layer probed is the last residual stage's map;
- the classifier: that map average-pooled over all its positions (``global_pooling`` true),
  flattened, one ``nn.Linear(d, classes)`` with its weight drawn from N(0, 0.01^2) and its
  bias 0, no batch norm (the optional one exists only without the global pooling);
- ``torch.optim.SGD`` over the classifier's weight and bias: lr 0.3, momentum 0.9, weight decay
  1e-6 coupled into the gradient, no Nesterov; the mean cross-entropy of each batch;
- the rate of 0-based epoch e < T: ``final_lr + (lr - final_lr) (1 + cos(pi e / T)) / 2``
  (``CosineAnnealingLR(T = epochs, eta_min = final_lr)`` stepped once after every epoch),
  final_lr 0, T = 100 epochs; a batch of 32 on each of 8 processes (256 in all), a fresh order
  each epoch (``DistributedSampler``), the last batch partial;
- training view: ``RandomResizedCrop(224)`` (scale 0.08-1, ratio 3/4-4/3) + horizontal flip;
  test view: ``Resize(256)`` + ``CenterCrop(224)``; both normalised by the ImageNet mean and the
  std (0.228, 0.224, 0.225);
- after every epoch, the whole validation split: top-1 and top-5 (in %) and the mean loss; the
  figure the script ends on is the best top-1 over the epochs.

This module holds the protocol's settings and its rate per epoch; what it shares with
OpenSelfSup's linear evaluation (the pooling, the initialisation, the scores of the centre crop,
the common settings) is ``dcjax.evaluation.pooled_probe``'s, the linear layer, its loss and the
SGD step are ``dcjax.evaluation.probe_kernels``'s, and ``dcjax.training.swav_eval`` runs the
protocol over a run's image banks.

Differences left:

- crops from dcjax's image banks (each image fitted to an S x S square, shorter side S, centre
  crop): ``RandomResizedCrop`` draws torchvision's box on that square, not on the whole image;
  the centre crop is the official box, scaled by S / 256 (``dcjax.data.crops``), except that
  for a longer side L with L - 256 = 3 mod 4 the official centre lies one pixel further on
  (``CenterCrop`` rounds half to even, the bank's square floors), and with S != 256 the box is
  resampled bilinearly without PIL's antialiasing;
- the normalisation is the run's (``config.input``), where the official divides red by 0.228;
- the official processes each draw an equal share of the train split padded by repeating a few
  images (``DistributedSampler``), and each has its own partial last batch; dcjax cuts one
  permutation of the whole split into batches of 256, the last one partial;
- the official without global pooling (``AvgPool2d(6)`` + optional batch norm, 8192 values) and
  its step schedule and Nesterov flags are not implemented.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from dcjax.core.errors import ConfigError
from dcjax.evaluation.pooled_probe import (
    DEFAULT_LAYER,
    INIT_STD,
    PooledProbeConfig,
    centre_scores,
    global_pool,
    initial_params,
)
from dcjax.evaluation.probe_kernels import LayerScores

__all__ = [
    "DEFAULT_LAYER",
    "INIT_STD",
    "SwavProbeConfig",
    "SwavProbeResult",
    "centre_scores",
    "global_pool",
    "initial_params",
    "learning_rate",
]


@dataclasses.dataclass(frozen=True)
class SwavProbeConfig(PooledProbeConfig):
    """The protocol's settings (``config.eval.swav``), the official values by default: those of
    ``PooledProbeConfig`` (whose docstring says what they mean), and ``final_lr``, the cosine
    schedule's limit rate (``learning_rate`` its first).

    Raises:
      ConfigError: naming the ``config.eval.swav`` field that is out of range.
    """

    field: ClassVar[str] = "config.eval.swav"

    learning_rate: float = 0.3
    weight_decay: float = 1e-6
    final_lr: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.final_lr <= self.learning_rate:
            raise ConfigError(
                f"{self.field}.final_lr={self.final_lr} must be in [0, learning_rate="
                f"{self.learning_rate}]"
            )


class SwavProbeResult(LayerScores):
    """Scores per tested epoch (``LayerScores``); the test loss is the centre crop's."""

    def figures(self) -> dict[str, float]:
        """``swav_top1/<layer>`` and ``swav_top5/<layer>`` (the last epoch), and
        ``swav_best_top1/<layer>`` (the best tested epoch: the figure eval_linear.py reports)."""
        return self.layer_figures("swav")


def learning_rate(epoch: int, config: SwavProbeConfig) -> float:
    """The rate of 0-based ``epoch``, constant within it: the cosine from ``learning_rate`` at
    epoch 0 towards ``final_lr`` at epoch ``epochs`` (never reached)."""
    cos = math.cos(math.pi * epoch / config.epochs)
    return config.final_lr + (config.learning_rate - config.final_lr) * (1.0 + cos) / 2.0
