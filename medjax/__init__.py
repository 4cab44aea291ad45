"""medjax: lightweight medical image classification in JAX/Flax, fast on CPUs."""

__version__ = "0.1.0"
