"""NumPy float64 references of PyTorch's rules, shared by the official protocols' tests: each is
written from PyTorch's definition (or source), independently of dcjax's kernels."""

from __future__ import annotations

import numpy as np


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ce_grads(x, y, kernel, bias):
    """Mean cross-entropy of a Linear layer on (n, d) ``x`` and its gradients, float64."""
    p = softmax(x @ kernel + bias)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    p[np.arange(len(y)), y] -= 1.0
    return loss, {"kernel": x.T @ p / len(y), "bias": p.mean(0)}


def torch_sgd(params, state, grads, lr, momentum, wd):
    """torch.optim.SGD.step (dampening 0, no nesterov) as its source reads, in float64, in
    place: d_p = grad + wd * p; buf = d_p on the first step, then momentum * buf + d_p;
    p -= lr * buf."""
    for k in params:
        d_p = grads[k] + wd * params[k]
        state[k] = d_p.copy() if k not in state else momentum * state[k] + d_p
        params[k] = params[k] - lr * state[k]


def pool_side(n, window, stride, pad):
    """PyTorch's Conv2d / MaxPool2d / AvgPool2d output side, floor mode."""
    return (n + 2 * pad - window) // stride + 1


def torch_max_pool(x, window, stride, pad):
    """MaxPool2d of (B, H, W, C) as a loop over windows, the padding -inf."""
    b, h, w, c = x.shape
    padded = np.full((b, h + 2 * pad, w + 2 * pad, c), -np.inf)
    padded[:, pad : pad + h, pad : pad + w] = x
    oh, ow = pool_side(h, window, stride, pad), pool_side(w, window, stride, pad)
    out = np.empty((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            win = padded[:, i * stride : i * stride + window, j * stride : j * stride + window]
            out[:, i, j] = win.max(axis=(1, 2))
    return out


def torch_batch_norm_train(x, running_mean, running_var, momentum=0.1, eps=1e-5):
    """BatchNorm2d(affine=False).train() on (n, h, w, C) float64: (output, mean and variance
    buffers after): normalised by the biased variance, the buffers moved towards the mean and
    the unbiased variance."""
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = x.mean(axis=(0, 1, 2))
    var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
    out = (x - mean) / np.sqrt(var + eps)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)
    return out, new_mean, new_var
