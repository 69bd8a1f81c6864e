"""Training: state, train step, loop, checkpoints, metric writers, the run's evaluation.

clu's ``metric_writers`` package imports TensorFlow eagerly for its SummaryWriter, although only
that one writer needs it. dcjax writes TensorBoard files through tensorboardX instead, so when
TensorFlow is absent a stand-in module is registered first and the rest of clu (writers, periodic
actions) imports without it.
"""

import importlib.util
import sys
import types


def _allow_clu_without_tensorflow() -> None:
    name = "clu.metric_writers.summary_writer"
    if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        return

    class SummaryWriter:  # only reached if someone asks clu for its TF writer
        def __init__(self, *args, **kwargs):
            raise ImportError("clu's SummaryWriter needs TensorFlow; dcjax uses tensorboardX")

    stand_in = types.ModuleType(name)
    stand_in.SummaryWriter = SummaryWriter
    sys.modules[name] = stand_in


_allow_clu_without_tensorflow()
