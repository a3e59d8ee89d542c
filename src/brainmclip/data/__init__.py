"""Stage 1 of the data flow: NSD files (real or simulated) to model inputs."""

from .synthetic import make_synthetic_nsd

__all__ = ["make_synthetic_nsd"]
