"""The inference path for the cross and coarse CAMs (class-token attention rows only)."""

from __future__ import annotations

import pytest
import torch

from weaktr_cli.models.cam_vit import WeakTrCAM, cam_maps


@pytest.mark.parametrize("fusion", ["aaf", "aaf-feat", "mean-sum"])
def test_cross_and_coarse_cams_match_the_full_forward(one_torch_thread: None, fusion: str
                                                      ) -> None:
    torch.manual_seed(0)
    model = WeakTrCAM("micro", 3, fusion=fusion, aaf_reduction=2)
    model.eval()
    images = torch.randn(2, 3, 40, 48)
    with torch.inference_mode():
        full = model(images, with_maps=True)
        assert model.cross_cams(images) is not None
        cross, coarse = cam_maps(model, images, "cross"), cam_maps(model, images, "coarse")
    assert full.cross_cam is not None and full.coarse_cam is not None
    # the same maps up to float rounding (fused attention sums in another order)
    torch.testing.assert_close(cross, full.cross_cam, rtol=1e-4, atol=1e-6 * float(cross.max()))
    torch.testing.assert_close(coarse, full.coarse_cam.clamp(min=0), rtol=1e-4, atol=1e-5)


def test_max_pooled_fusion_and_training_take_the_full_forward(one_torch_thread: None) -> None:
    torch.manual_seed(0)
    model = WeakTrCAM("micro", 3, fusion="aaf", aaf_pool="max").eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert model.cross_cams(images) is None  # max pooling needs the whole maps
        full = model(images, with_maps=True)
        torch.testing.assert_close(cam_maps(model, images, "cross"), full.cross_cam)
    model.train()
    out = cam_maps(model, images, "cross")  # training keeps the differentiable full path
    assert out.requires_grad
