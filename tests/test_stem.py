"""The conv-stem ("hybrid") backbone: token grid, size contracts, CAM model, export."""

from __future__ import annotations

import pytest
import torch

from weaktr_cli.models.cam_vit import WeakTrCAM
from weaktr_cli.models.registry import ArchSpec, build_vit, get_arch
from weaktr_cli.models.segmenter import build_segmenter
from weaktr_cli.models.stem import ConvStemPatchEmbed, stem_stride

HYBRID = ArchSpec(name="test-hybrid", patch_size=8, embed_dim=32, depth=2, num_heads=2,
                  img_size=32, stem=((8, 2, 1), (16, 2, 1), (16, 2, 1), (16, 1, 2)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stem_replaces_the_linear_patch_embedding() -> None:
    vit = build_vit(HYBRID)
    assert isinstance(vit.patch_embed, ConvStemPatchEmbed)
    assert vit.patch_embed.patch_size == (8, 8) and stem_stride(HYBRID.stem) == 8
    convs = [m for m in vit.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]  # the last is the 1x1 projection
    assert convs[-1].out_channels == 32 and convs[-1].kernel_size == (1, 1)
    plain = build_vit(get_arch("tiny-p8"))
    assert not isinstance(plain.patch_embed, ConvStemPatchEmbed)


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (96, 24)])
def test_one_token_per_patch_for_multiples_of_the_patch(size: tuple[int, int]) -> None:
    tokens = build_vit(HYBRID).eval().forward_features(torch.randn(2, 3, *size))
    assert tokens.shape == (2, 1 + size[0] // 8 * (size[1] // 8), 32)


def test_stride_must_match_the_patch_size() -> None:
    with pytest.raises(ValueError, match="stem stride"):
        ArchSpec(name="bad", patch_size=16, embed_dim=32, depth=1, num_heads=2, img_size=32,
                 stem=((8, 2, 1), (16, 2, 1)))


def test_stem_reaches_beyond_its_patch() -> None:
    # The dilated layers see neighbouring patches (a linear patch embedding sees only its own):
    # changing one far pixel moves the token of another patch.
    embed = build_vit(HYBRID).eval().patch_embed
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[:, :, 0, 0] += 5.0
    with torch.no_grad():
        a, b = embed(x), embed(y)  # (1, 4, 4, D) tokens (NHWC)
    # token (2, 2) is 16-23 px away: only the dilation-2 layer reaches patch (0, 0)
    assert not torch.allclose(a[0, 2, 2], b[0, 2, 2])
    assert torch.equal(a[0, 3, 3], b[0, 3, 3])


def test_segmenter_and_cam_model_accept_a_hybrid_backbone() -> None:
    torch.manual_seed(0)
    seg = build_segmenter(3, HYBRID, img_size=32).eval()
    assert seg(torch.randn(2, 3, 37, 45)).shape == (2, 3, 37, 45)
    cam = WeakTrCAM(HYBRID, num_classes=2).eval()
    out = cam(torch.randn(1, 3, 40, 27), with_maps=True)
    assert out.fine_cam is not None and out.fine_cam.shape == (1, 2, 5, 3)


@pytest.mark.parametrize("example", [(2, 3, 37, 45), (2, 3, 32, 40)])
def test_hybrid_segmenter_exports_with_dynamic_sizes(example: tuple[int, ...]) -> None:
    # An example whose sides are multiples of the patch must not drop the crop from the graph
    # (eager skips it for such inputs).
    torch.manual_seed(0)
    model = build_segmenter(3, HYBRID, img_size=32).eval()
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    program = torch.export.export(model, (torch.randn(example),),
                                  dynamic_shapes={"images": dims})
    exported = program.module()
    for shape in [(1, 3, 32, 32), (3, 3, 50, 61)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_stem_only_segmenter_has_no_blocks_and_no_final_norm() -> None:
    spec = get_arch("tiny-c8-stem")
    torch.manual_seed(0)
    model = build_segmenter(7, spec, img_size=96, decoder="linear").eval()
    assert len(model.encoder.blocks) == 0
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    assert model(torch.randn(2, 3, 96, 72)).shape == (2, 7, 96, 72)
    # The checkpoint spells the backbone out, final_norm included.
    rebuilt = type(model).from_config(model.config())
    assert isinstance(rebuilt.encoder.norm, torch.nn.Identity)
    assert rebuilt.encoder.patch_embed.proj[0].out_channels == 16


def test_final_norm_defaults_on() -> None:
    assert not isinstance(build_vit(get_arch("tiny-c8")).norm, torch.nn.Identity)
    assert "final_norm" not in get_arch("tiny-c8").vit_kwargs()
