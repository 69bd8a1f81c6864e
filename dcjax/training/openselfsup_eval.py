"""OpenSelfSup's linear evaluation run over a run's image banks (``eval.protocol =
"openselfsup"``).

The protocol, its settings and its rate per epoch are in ``dcjax.evaluation.openselfsup_probe``
(whose docstring says what the official benchmark does and what differs). Everything else (the
training view: torchvision's ``RandomResizedCrop`` + flip; the centre crop; the classifier's
carry and step: global pooling, mean cross-entropy, SGD; the scores) it shares with SwAV's
protocol in ``dcjax.training.pooled_eval.PooledProbe``; what is OpenSelfSup's own here is the
step rate of each epoch and the test of the initial weights.
"""

from __future__ import annotations

import jax.numpy as jnp

from dcjax.evaluation.openselfsup_probe import OpenselfsupProbeResult, learning_rate
from dcjax.training.pooled_eval import PooledProbe

__all__ = ["OpenselfsupProbe"]


class OpenselfsupProbe(PooledProbe):
    """OpenSelfSup's protocol for one model and input view (``PooledProbe`` with an
    ``OpenselfsupProbeConfig``): the rate of each epoch is the step rate of
    ``openselfsup_probe.learning_rate``, and the initial weights are scored as epoch 0 when
    ``test_initial``.
    """

    name = "openselfsup probe"
    result_type = OpenselfsupProbeResult

    def epoch_hyper(self, epoch):
        return jnp.float32(learning_rate(epoch - 1, self.config))

    def tests_before_training(self):
        return self.config.test_initial
