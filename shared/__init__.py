"""Code both stages use: the activation cache format (v1) and config helpers.

Imports are one-way: ``harvest`` and ``train`` depend on ``shared``; ``shared`` on neither,
so a cache can be read without the trainer installed.
"""

from shared.cache import Cache, CacheWriter, open_cache, verify_cache
from shared.cache_format import FORMAT_VERSION, CacheError, Manifest, ShardRecord

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "CacheError",
    "CacheWriter",
    "Manifest",
    "ShardRecord",
    "open_cache",
    "verify_cache",
]

__version__ = "0.1.0"
