"""raekern: compiled kernels for representation-autoencoder (RAE) latent diffusion.

Importing raekern loads the compiled library (raekern._C), which registers every op under
``torch.ops.raekern``; the typed Python API lives in :mod:`raekern.ops`.
"""
from raekern._utils.library import cpu_output_cache_bytes, release_cpu_output_cache
from raekern._utils.library import load_library as _load_library

_load_library()

from raekern import ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "release_cpu_output_cache", "cpu_output_cache_bytes", "__version__"]
