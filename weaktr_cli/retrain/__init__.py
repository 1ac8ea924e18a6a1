"""Phase 4: online retraining of a Segmenter on pseudo-label seeds with gradient clipping.

`retrain(train_set, seeds, out, config)` (`weaktr_cli.retrain.loop`) trains on the seeds of a
``labels`` artifact, or on threshold seeds computed on the fly from a ``cams`` artifact
(`SeedSource`), with the augmentation of `augment` and the samples and order of
`weaktr_cli.retrain.samples`. Settings: `weaktr_cli.settings.RetrainConfig`; named recipes:
`weaktr_cli.recipes`; loading the result: `weaktr_cli.models.io.load_segmenter`.
"""

from weaktr_cli.models.io import load_segmenter
from weaktr_cli.models.segmenter import use_explicit_attention
from weaktr_cli.models.weights import load_encoder_weights
from weaktr_cli.recipes import RETRAIN_RECIPES
from weaktr_cli.retrain.augment import augment
from weaktr_cli.retrain.loop import RetrainResult, build_model, poly_lr, retrain
from weaktr_cli.retrain.seed_source import SeedSource
from weaktr_cli.settings import NORMALIZATIONS, RetrainConfig, resolve_normalization

__all__ = [
    "NORMALIZATIONS",
    "RETRAIN_RECIPES",
    "RetrainConfig",
    "RetrainResult",
    "SeedSource",
    "augment",
    "build_model",
    "load_encoder_weights",
    "load_segmenter",
    "poly_lr",
    "resolve_normalization",
    "retrain",
    "use_explicit_attention",
]
