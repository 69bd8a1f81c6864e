"""The bottom layer: the device mesh and shardings, multi-process helpers, host copies.

Everything else in dcjax may import it; it imports nothing of dcjax.
"""
