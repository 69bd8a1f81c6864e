"""dcjax: DeepCluster-family self-supervised learning in JAX/Flax."""
