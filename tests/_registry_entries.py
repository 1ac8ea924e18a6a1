"""Registry entries that exist for the tests only: the `micro` backbone and the `smoke` recipe.

`tests/conftest.py` registers them for every test; `ddp_probe.py` (run by torchrun, outside
pytest) registers them itself.
"""

from __future__ import annotations

from weaktr_cli.models.registry import ARCHS, ArchSpec, register_arch
from weaktr_cli.recipes import SeedRecipe, register
from weaktr_cli.settings import CamSettings, CamTrainConfig, PredictSettings, RetrainConfig

MICRO = ArchSpec(name="micro", patch_size=8, embed_dim=64, depth=2, num_heads=2, img_size=32,
                 description="unit tests: patch 8, dim 64, depth 2 at 32 px")


def register_test_entries() -> None:
    """Register `micro` and `smoke` (idempotent)."""
    if "micro" not in ARCHS:
        register_arch(MICRO)
    # A few optimizer steps of a micro model: the end-to-end tests' plumbing check. Its
    # retraining starts from the CAM backbone and ignores ambiguous seed pixels (read from
    # the seeds' CAMs), which keeps those paths exercised.
    register(
        "smoke",
        cam=CamTrainConfig(arch="micro", epochs=1, batch_size=8, base_lr=4e-3,
                           warmup_epochs=0.0, input_size=32, crop_scale=(0.5, 1.0),
                           randaugment=False, random_erasing=0.0, drop_path=0.0,
                           precision="fp32", seed=0),
        dump=CamSettings(scales=(1.0,), flip=True, variant="cross", power=0.5),
        seeds=SeedRecipe(bg=0.43, preset="voc"),
        retrain=RetrainConfig(arch="micro", crop_size=32, batch_size=4, iterations=4,
                              optimizer="adamw", lr=1e-3, encoder_lr_mult=1.0, tau="auto",
                              tau_auto_steps=2, clip_patch=8, drop_path=0.0, log_every=2,
                              ambiguity=0.7),
        predict=PredictSettings(flip=False),
        retrain_from_cam=True,
    )
