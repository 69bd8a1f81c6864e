"""SwAV's linear evaluation run over a run's image banks (``eval.protocol = "swav"``).

The protocol, its settings and its rate per epoch are in ``dcjax.evaluation.swav_probe``
(whose docstring says what the official ``eval_linear.py`` does and what differs). Everything
else (the training view: torchvision's ``RandomResizedCrop`` + flip; the centre crop; the
classifier's carry and step: global pooling, mean cross-entropy, SGD; the scores) it shares with
OpenSelfSup's protocol in ``dcjax.training.pooled_eval.PooledProbe``; what is SwAV's own here is
the cosine rate of each epoch.
"""

from __future__ import annotations

import jax.numpy as jnp

from dcjax.evaluation.swav_probe import SwavProbeResult, learning_rate
from dcjax.training.pooled_eval import PooledProbe, test_views, train_view

__all__ = ["SwavProbe", "test_views", "train_view"]


class SwavProbe(PooledProbe):
    """SwAV's protocol for one model and input view (``PooledProbe`` with a
    ``SwavProbeConfig``): the rate of each epoch is the cosine of ``swav_probe.learning_rate``.
    """

    name = "swav probe"
    result_type = SwavProbeResult

    def epoch_hyper(self, epoch):
        return jnp.float32(learning_rate(epoch - 1, self.config))
