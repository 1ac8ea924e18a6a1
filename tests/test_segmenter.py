"""Segmenter (retraining model): shapes, padding, decoder layers, param groups, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from weaktr_cli.errors import WeakTrError
from weaktr_cli.losses import plain_ce_loss
from weaktr_cli.models.registry import ArchSpec
from weaktr_cli.models.segmenter import Segmenter, build_segmenter, param_groups

TINY = ArchSpec(name="test-tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
N_CLS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **kwargs) -> Segmenter:
    torch.manual_seed(seed)
    return build_segmenter(N_CLS, TINY, img_size=32, **kwargs)


@pytest.mark.parametrize("size", [(32, 32), (37, 45), (5, 7), (16, 41)])
def test_output_shape_any_size(size):
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, N_CLS, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_padding_is_bottom_right_zeros():
    # The model pads to a multiple of 8 itself; padding by hand must give the same logits on
    # the original pixels.
    model = tiny_model().eval()
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        out = model(x)
        padded = model(F.pad(x, (0, 3, 0, 3)))
    torch.testing.assert_close(out, padded[:, :, :37, :45])


def test_return_layers():
    model = tiny_model(decoder_layers=3).eval()
    x = torch.randn(2, 3, 24, 30)
    with torch.no_grad():
        layers = model(x, return_layers=True)
        final = model(x)
    assert isinstance(layers, tuple) and len(layers) == model.num_decoder_layers == 3
    for masks in layers:
        assert masks.shape == (2, N_CLS, 24, 30)
    torch.testing.assert_close(layers[-1], final)
    assert not torch.allclose(layers[0], layers[-1])


def test_masks_are_normalised_over_classes():
    # mask_norm is a LayerNorm over classes (identity affine at init) and bilinear upsampling
    # is linear, so every pixel's logits have zero mean over classes.
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 19, 23))
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, 19, 23), atol=1e-5, rtol=0)


def test_reference_parameter_names():
    names = {n for n, _ in tiny_model().named_parameters()}
    for name in (
        "decoder.cls_emb",
        "decoder.proj_dec.weight",
        "decoder.proj_patch",
        "decoder.proj_classes",
        "decoder.decoder_norm.weight",
        "decoder.mask_norm.weight",
        "decoder.blocks.1.attn.qkv.weight",
        "decoder.blocks.1.mlp.fc2.bias",
        "encoder.cls_token",
        "encoder.pos_embed",
        "encoder.patch_embed.proj.weight",
        "encoder.norm.weight",
    ):
        assert name in names
    model = tiny_model()
    assert model.encoder.pos_embed.shape == (1, 1 + 4 * 4, 32)  # 32 px crop, patch 8
    assert model.decoder.blocks[0].mlp.fc1.out_features == 4 * 32
    assert model.decoder.blocks[0].attn.num_heads == TINY.num_heads


def test_vit_small_size_matches_paper():
    # Paper: 26.3 M parameters including the reference encoder's unused 1000-class head
    # (384 * 1000 + 1000); ours has no head.
    model = build_segmenter(21, "vit-small")
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params + 385_000 - 26.3e6) < 0.1e6
    assert model.encoder.pos_embed.shape[1] == 1 + 30 * 30


def test_param_groups():
    model = tiny_model()
    groups = param_groups(model, lr=1e-4)
    assert [g["name"] for g in groups] == ["encoder", "decoder"]
    assert groups[0]["lr"] == pytest.approx(1e-5) and groups[0]["lr_mult"] == 0.1
    assert groups[1]["lr"] == pytest.approx(1e-4) and groups[1]["lr_mult"] == 1.0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.encoder.parameters()}
    optimizer = torch.optim.SGD(groups, lr=1e-4, momentum=0.9, nesterov=True)
    assert [g["lr"] for g in optimizer.param_groups] == [groups[0]["lr"], groups[1]["lr"]]

    model.encoder.requires_grad_(False)
    assert [g["name"] for g in param_groups(model, lr=1e-3, encoder_lr_mult=0.5)] == ["decoder"]


def fit_losses(model: Segmenter, images: torch.Tensor, target: torch.Tensor,
               steps: int) -> list[float]:
    """Train `model` on one batch with AdamW for `steps` steps; the loss of every step."""
    optimizer = torch.optim.AdamW(param_groups(model, lr=2e-3, encoder_lr_mult=1.0))
    model.train()
    losses = []
    for _ in range(steps):
        loss = plain_ce_loss(model(images), target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def export_dynamic(model: Segmenter) -> torch.nn.Module:
    """`model` through torch.export with dynamic batch, H and W."""
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    example = torch.randn(2, 3, 37, 45)  # batch 2: a size-1 dim would be specialised
    program = torch.export.export(model, (example,), dynamic_shapes={"images": dims})
    return program.module()


def test_tiny_overfit_loss_decreases():
    torch.manual_seed(0)
    model = tiny_model(seed=1)
    images = torch.randn(2, 3, 32, 32)
    # one random class per 8 x 8 patch: learnable at the patch grid's resolution (the class
    # LayerNorm bounds the logits, so sub-patch detail would floor the loss high)
    target = torch.randint(0, N_CLS, (2, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    target[:, :2, :] = 255
    losses = fit_losses(model, images, target, 40)
    assert losses[-1] < 0.5 * losses[0], losses


def test_torch_export_dynamic_height_width():
    model = tiny_model().eval()
    exported = export_dynamic(model)
    # a multiple of the patch size (no padding), odd sizes, other batch sizes, a 40 x 2 grid
    for shape in [(1, 3, 32, 32), (3, 3, 50, 61), (2, 3, 17, 320)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_rejects_unsuitable_encoders():
    with pytest.raises(WeakTrError, match="class token"):
        Segmenter(VisionTransformer(**TINY.vit_kwargs(), class_token=False, global_pool="avg"), 3)
    with pytest.raises(WeakTrError, match="dynamic_img_size"):
        Segmenter(VisionTransformer(**TINY.vit_kwargs(), num_classes=0), 3)
    with pytest.raises(WeakTrError, match="final norm"):
        Segmenter(
            VisionTransformer(**TINY.vit_kwargs(), dynamic_img_size=True, global_pool="avg"), 3
        )
    with pytest.raises(WeakTrError, match="at least 2 classes"):
        Segmenter(tiny_model().encoder, 1)
    with pytest.raises(WeakTrError, match="divisible"):
        tiny_model(decoder_heads=3)
    with pytest.raises(WeakTrError, match="unknown architecture"):
        build_segmenter(3, "no-such-vit")


def test_build_segmenter_defaults_are_vit_small_at_480():
    encoder = build_segmenter(21).encoder
    assert len(encoder.blocks) == 12
    assert encoder.embed_dim == 384
    assert encoder.patch_embed.patch_size == (16, 16)
    assert encoder.pos_embed.shape == (1, 1 + 30 * 30, 384)
    assert encoder.dynamic_img_size


def test_linear_decoder_is_one_linear_layer_per_patch():
    # Segmenter's linear baseline: logits on the patch grid are head(token), upsampled.
    model = tiny_model(decoder="linear").eval()
    assert model.num_decoder_layers == 1
    assert sorted(k for k in model.state_dict() if k.startswith("decoder.")) == [
        "decoder.head.bias", "decoder.head.weight"]
    with torch.no_grad():
        model.decoder.head.bias.copy_(torch.arange(N_CLS, dtype=torch.float32))
        x = torch.randn(2, 3, 32, 40)
        tokens = model.encoder.forward_features(x)[:, 1:]  # (2, 4 * 5, 32)
        grid = model.decoder.head(tokens).transpose(1, 2).reshape(2, N_CLS, 4, 5)
        expected = F.interpolate(grid, size=(32, 40), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected)
        layers = model(torch.randn(1, 3, 21, 19), return_layers=True)
    assert len(layers) == 1 and layers[0].shape == (1, N_CLS, 21, 19)


def test_linear_decoder_learns_and_exports():
    model = tiny_model(seed=1, decoder="linear")
    images = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, N_CLS, (2, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    losses = fit_losses(model, images, target, 30)
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    exported = export_dynamic(model)
    x = torch.randn(1, 3, 50, 61)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_unknown_decoder_is_a_clear_error():
    with pytest.raises(WeakTrError, match="unknown decoder 'conv'"):
        tiny_model(decoder="conv")
