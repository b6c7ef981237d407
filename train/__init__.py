"""Stage 2: activation shards -> trained dictionaries (loader, models, losses, trainer, analysis).

Depends on ``shared`` only, never on ``harvest``.
"""

from train.loader import ActivationLoader, default_eval_shards

__all__ = ["ActivationLoader", "default_eval_shards"]
