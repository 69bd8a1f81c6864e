"""dcjax: DeepCluster-family self-supervised learning in JAX/Flax."""

__all__ = ["load"]


def load(workdir: str):
    """A trained run from its workdir, with ``embed(images)``: see ``dcjax.export.load``."""
    from dcjax.export import load as load_run  # JAX is imported only when a run is loaded

    return load_run(workdir)
