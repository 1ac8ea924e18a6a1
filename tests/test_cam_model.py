"""WeakTrCAM: shapes, attention capture, fine-CAM maths, fusion, losses, pretrained loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models import (
    ArchSpec,
    WeakTrCAM,
    arch_names,
    build_vit,
    cam_loss,
    cam_maps,
    get_arch,
    load_pretrained_backbone,
)
from weaktr_cli.models.cam_vit import WeakTrAttention, record_attention, resample_patch_pos_embed
from weaktr_cli.models.registry import ARCHS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # restored after each test
C = 3


def make_model(fusion: str = "aaf", **kwargs: object) -> WeakTrCAM:
    """A micro CAM model in eval mode; micro has only 4 attention maps, so r defaults to 2."""
    torch.manual_seed(0)
    kwargs.setdefault("aaf_reduction", 2)
    return WeakTrCAM("micro", C, fusion=fusion, **kwargs).eval()  # type: ignore[arg-type]


# --- registry ----------------------------------------------------------------------------


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(WeakTrError) as err:
        get_arch("deit-huge")
    assert "deit-huge" in str(err.value)
    for name in ("deit-small", "vit-small", "deit-tiny", "tiny-p8", "micro"):
        assert name in str(err.value)
    assert arch_names()[:3] == ["deit-small", "vit-small", "deit-tiny"]


@pytest.mark.parametrize("name", [n for n, s in ARCHS.items() if s.timm_name])
def test_registry_matches_timm_models(name: str) -> None:
    spec = get_arch(name)
    assert spec.timm_name is not None
    theirs = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, device="meta")
    ours = build_vit(spec, device="meta")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert ours.blocks[0].norm1.eps == 1e-6
    assert ours.blocks[0].attn.qkv.bias is not None
    assert tuple(ours.patch_embed.grid_size) == spec.grid_size


def test_deit_small_dimensions() -> None:
    spec = get_arch("deit-small")
    assert (spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads, spec.img_size) == (
        16, 384, 12, 6, 224,
    )  # fmt: skip
    assert spec.num_attention_maps == 72 and spec.head_dim == 64
    assert get_arch("vit-small").img_size == 384
    paper = WeakTrCAM("deit-small", 20, fusion="aaf")
    assert paper.fusion.head_ffn[0].weight.shape == (18, 72)
    assert paper.pos_embed.shape == (1, 20 + 196, 384) and paper.cls_token.shape == (1, 20, 384)
    released = WeakTrCAM("deit-small", 20, fusion="aaf-feat")
    assert released.fusion.head_ffn[0].weight.shape == (9, 72)
    assert released.fusion.feat_ffn[0].weight.shape == (8, 64)


# --- forward shapes ----------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["aaf", "aaf-feat", "mean-sum"])
@pytest.mark.parametrize("size", [(32, 32), (40, 27), (64, 48), (17, 70)])
def test_output_shapes(fusion: str, size: tuple[int, int]) -> None:
    model = make_model(fusion)
    h, w = size[0] // 8, size[1] // 8
    out = model(torch.randn(2, 3, *size), with_maps=True)
    for logits in (out.token_logits, out.coarse_logits, out.fine_logits):
        assert logits.shape == (2, C) and torch.isfinite(logits).all()
    for cam in (out.coarse_cam, out.cross_cam, out.fine_cam):
        assert cam is not None and cam.shape == (2, C, h, w)
    assert out.head_weights is not None and out.head_weights.shape == (2, 4)
    assert (out.fine_cam >= 0).all() and (out.cross_cam >= 0).all()  # type: ignore[operator]
    plain = model(torch.randn(1, 3, *size))
    assert plain.fine_cam is None and plain.head_weights is None


def test_input_smaller_than_a_patch_is_rejected() -> None:
    with pytest.raises(WeakTrError, match="smaller than one 8x8 patch"):
        make_model()(torch.randn(1, 3, 7, 32))


def test_remainder_pixels_are_ignored() -> None:
    model = make_model()
    x = torch.randn(1, 3, 40, 27)
    a = model(x, with_maps=True).fine_cam
    x[:, :, :, 24:] = 100.0  # columns beyond floor(27 / 8) * 8 never reach a patch
    b = model(x, with_maps=True).fine_cam
    torch.testing.assert_close(a, b)


# --- attention capture -------------------------------------------------------------------


def _records(model: WeakTrCAM) -> list[object]:
    return [blk.attn.record for blk in model.backbone.blocks]


def test_recording_is_released_after_forward_and_after_an_error() -> None:
    model = make_model("aaf-feat")
    model(torch.randn(1, 3, 32, 32))
    assert _records(model) == [None, None]
    assert not any(m._forward_hooks for m in model.modules())

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    handle = model.backbone.blocks[-1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert _records(model) == [None, None]


def test_recorded_attention_matches_timm_forward() -> None:
    model = make_model("aaf-feat")
    blocks = model.backbone.blocks
    assert all(isinstance(b.attn, WeakTrAttention) for b in blocks)
    x = torch.randn(2, C + 16, 64)
    plain = blocks(x)  # no record: timm's own (fused) attention
    with record_attention(blocks, keep_outputs=True) as rec:
        recorded = blocks(x)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert len(rec.maps) == 2 and rec.maps[0].shape == (2, 2, C + 16, C + 16)
    torch.testing.assert_close(rec.maps[1].sum(-1), torch.ones(2, 2, C + 16))
    assert len(rec.outputs) == 2 and rec.outputs[0].shape == (2, C + 16, 64)
    assert all(b.attn.record is None for b in blocks)


def test_record_attention_rejects_plain_timm_blocks() -> None:
    vit = build_vit(get_arch("micro"))
    with pytest.raises(WeakTrError, match="WeakTrAttention"), record_attention(vit.blocks):
        pass


# --- fine CAM and fusion -----------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["aaf", "aaf-feat"])
def test_fine_cam_equals_naive_einsum(fusion: str) -> None:
    model = make_model(fusion, aaf_pool="max")
    captured: list[torch.Tensor] = []
    hooks = [
        blk.attn.register_forward_hook(lambda m, i, o: captured.append(m.record.maps[-1]))
        for blk in model.backbone.blocks
    ]
    out = model(torch.randn(2, 3, 40, 56), with_maps=True)
    for h in hooks:
        h.remove()
    b, c, h, w = out.fine_cam.shape  # type: ignore[union-attr]
    maps = torch.cat(captured, dim=1)  # (B, L*H, N, N), layer-major like head_weights
    fused = (out.head_weights[:, :, None, None] * maps).mean(1)  # type: ignore[index]
    cross = fused[:, :c, c:].reshape(b, c, h, w)
    patch_attn = fused[:, c:, c:]
    cross_cam = cross * out.coarse_cam.clamp(min=0)  # type: ignore[union-attr]
    fine = torch.einsum("bpq,bcq->bcp", patch_attn, cross_cam.flatten(2)).reshape(b, c, h, w)
    torch.testing.assert_close(out.cross_cam, cross_cam)
    torch.testing.assert_close(out.fine_cam, fine)
    torch.testing.assert_close(out.fine_logits, fine.mean((2, 3)))
    torch.testing.assert_close(out.coarse_logits, out.coarse_cam.mean((2, 3)))  # type: ignore[union-attr]


def test_avg_pooled_aaf_weights_are_image_independent_max_pooled_are_not() -> None:
    images = torch.randn(4, 3, 32, 32)
    weights = {}
    for pool in ("avg", "max"):
        model = make_model("aaf", aaf_pool=pool, aaf_reduction=1)
        torch.manual_seed(2)
        with torch.no_grad():  # large weights (positive into the ReLU) expose input dependence
            model.fusion.head_ffn[0].weight.normal_(std=3.0).abs_()
            model.fusion.head_ffn[2].weight.normal_(std=3.0)
        weights[pool] = model(images, with_maps=True).head_weights
    avg, mx = weights["avg"], weights["max"]
    assert avg is not None and mx is not None
    assert (avg - avg[:1]).abs().amax() < 1e-6
    assert (mx - mx[:1]).abs().amax() > 1e-4  # measured 1.2e-3; float noise is ~1e-7
    ones = make_model("mean-sum")(images, with_maps=True).head_weights
    assert ones is not None and torch.equal(ones, torch.ones(4, 4))


def test_aaf_hidden_size_follows_reduction() -> None:
    # defaults follow each variant's recipe: paper AAF avg / r 4, released aaf-feat max / r 8
    model = WeakTrCAM("tiny-p8", 20, fusion="aaf")
    assert (model.aaf_pool, model.aaf_reduction) == ("avg", 4)
    assert model.fusion.head_ffn[0].weight.shape == (4, 16)  # 16 maps // 4
    feat = WeakTrCAM("tiny-p8", 20, fusion="aaf-feat")
    assert (feat.aaf_pool, feat.aaf_reduction) == ("max", 8)
    assert feat.fusion.feat_ffn[0].weight.shape == (4, 32)  # head dim 32 // 8
    assert feat.fusion.head_ffn[0].weight.shape == (2, 16)
    assert WeakTrCAM("tiny-p8", 20, aaf_reduction=2).fusion.head_ffn[2].weight.shape == (16, 8)
    with pytest.raises(WeakTrError, match="no hidden units"):
        WeakTrCAM("micro", 3, aaf_reduction=8)
    with pytest.raises(WeakTrError, match="unknown fusion"):
        WeakTrCAM("micro", 3, fusion="sum")
    with pytest.raises(WeakTrError, match="avg, max"):
        WeakTrCAM("micro", 3, aaf_pool="mean")


# --- losses and gradients ----------------------------------------------------------------


def test_cam_loss_parts_and_cam_maps_variants() -> None:
    model = make_model()
    images = torch.randn(2, 3, 32, 40)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = model(images, with_maps=True)
    total, parts = cam_loss(out, targets)
    assert set(parts) == {"token", "coarse", "fine"}
    torch.testing.assert_close(total, parts["token"] + parts["coarse"] + parts["fine"])
    torch.testing.assert_close(
        parts["fine"], F.multilabel_soft_margin_loss(out.fine_logits, targets)
    )
    torch.testing.assert_close(cam_maps(model, images, "fine"), out.fine_cam)
    torch.testing.assert_close(cam_maps(model, images, "cross"), out.cross_cam)
    torch.testing.assert_close(cam_maps(model, images, "coarse"), out.coarse_cam.clamp(min=0))  # type: ignore[union-attr]
    with pytest.raises(WeakTrError, match="fine, cross, coarse"):
        cam_maps(model, images, "gradcam")
    with pytest.raises(WeakTrError, match="label shape"):
        cam_loss(out, targets[:, :2])


def test_fine_loss_trains_only_fusion_by_default() -> None:
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    for detach in (True, False):
        model = make_model("aaf", aaf_pool="max", detach_fine=detach).train()
        _, parts = cam_loss(model(images), targets)
        parts["fine"].backward()
        backbone = [p.grad for p in model.backbone.parameters()] + [model.head.weight.grad]
        backbone_moved = any(g is not None and g.abs().sum() > 0 for g in backbone)
        fusion_grads = [p.grad for p in model.fusion.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in fusion_grads)
        assert backbone_moved is (not detach)


def test_loss_decreases_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = WeakTrCAM("micro", C, fusion="aaf", aaf_pool="max").train()
    images = torch.randn(4, 3, 32, 32)
    targets = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        total, _ = cam_loss(model(images), targets)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]


def test_config_round_trip() -> None:
    model = make_model("aaf-feat", aaf_pool="max", aaf_reduction=2)
    clone = WeakTrCAM.from_config(model.config())
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(clone.eval()(x).fine_logits, model(x).fine_logits)
    assert isinstance(clone.arch, ArchSpec) and clone.arch == model.arch


# --- positional embeddings ----------------------------------------------------------------


def test_pos_embed_resampling_is_reference_style() -> None:
    pos = torch.randn(1, 16, 8)
    same = resample_patch_pos_embed(pos, (4, 4), (4, 4))
    assert same.shape == (1, 16, 8)
    grid = pos.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(6.1 / 4, 3.1 / 4), mode="bicubic")
    out = resample_patch_pos_embed(pos, (4, 4), (6, 3))
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1).reshape(1, 18, 8))
    const = resample_patch_pos_embed(torch.full((1, 16, 2), 0.5), (4, 4), (7, 5))
    torch.testing.assert_close(const, torch.full((1, 35, 2), 0.5))


# --- pretrained backbones ----------------------------------------------------------------


def _imagenet_state(img_size: int = 48) -> dict[str, torch.Tensor]:
    """A timm ViT with micro dims, a 1000-way head and a 6x6 pos-embed grid (not micro's 4x4)."""
    torch.manual_seed(1)
    vit = build_vit(get_arch("micro"), img_size=img_size, num_classes=10)
    return {k: v.clone() for k, v in vit.state_dict().items()}


def _check_cam_loaded(model: WeakTrCAM, state: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    assert torch.equal(sd["cls_token"], state["cls_token"].repeat(1, C, 1))
    assert torch.equal(sd["pos_embed"][:, :C], state["pos_embed"][:, :1].repeat(1, C, 1))
    expected = resample_abs_pos_embed(
        state["pos_embed"][:, 1:], [4, 4], old_size=[6, 6], num_prefix_tokens=0, antialias=False
    )
    torch.testing.assert_close(sd["pos_embed"][:, C:], expected)
    for key in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias"):
        assert torch.equal(sd["backbone." + key], state[key])


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_load_pretrained_into_cam_model(tmp_path: Path, fmt: str) -> None:
    state = _imagenet_state()
    path = tmp_path / f"deit.{fmt}"
    if fmt == "pth":
        torch.save({"model": state, "epoch": 300}, path)  # DeiT's release layout
    else:
        save_file(state, str(path))
    model = make_model("aaf-feat")
    head_before = model.head.weight.clone()
    report = load_pretrained_backbone(model, path)
    _check_cam_loaded(model, state)
    assert torch.equal(model.head.weight, head_before)  # the CAM head stays freshly initialised
    assert report.dropped == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert report.pos_embed_resampled == ((6, 6), (4, 4))
    assert report.class_token_repeats == C
    assert "head.weight" in report.fresh and any(k.startswith("fusion.") for k in report.fresh)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32)).fine_logits).all()


def test_load_pretrained_into_plain_vit(tmp_path: Path) -> None:
    state = _imagenet_state(img_size=32)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    vit = build_vit(get_arch("micro"))
    report = load_pretrained_backbone(vit, path)
    assert report.dropped == ["head.bias", "head.weight"] and report.pos_embed_resampled is None
    for key, value in vit.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_wrong_keys_give_one_clear_error(tmp_path: Path) -> None:
    state = _imagenet_state()
    state["blocks.0.attn.qkv_w"] = state.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeakTrError) as err:
        load_pretrained_backbone(make_model(), path)
    msg = str(err.value)
    assert "1 missing key(s): backbone.blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected key(s): backbone.blocks.0.attn.qkv_w" in msg

    wide = build_vit(ArchSpec("wide", 8, 96, 2, 2, 32)).state_dict()
    torch.save(wide, path)
    with pytest.raises(WeakTrError) as err:
        load_pretrained_backbone(make_model(), path)
    assert "28 shape mismatch(es): backbone.blocks.0.attn.proj.bias [96] vs model [64]" in str(
        err.value
    )
    assert "(+23 more)" in str(err.value)


def test_unreadable_weights_are_reported(tmp_path: Path) -> None:
    with pytest.raises(WeakTrError, match="not found"):
        load_pretrained_backbone(make_model(), tmp_path / "missing.pth")
    npz = tmp_path / "vit.npz"
    npz.write_bytes(b"\0")
    with pytest.raises(WeakTrError, match="unsupported weights format"):
        load_pretrained_backbone(make_model(), npz)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeakTrError, match="weights-only"):
        load_pretrained_backbone(make_model(), junk)
    no_cls = tmp_path / "nocls.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(64, 3, 8, 8)}, no_cls)
    with pytest.raises(WeakTrError, match="not a ViT checkpoint"):
        load_pretrained_backbone(make_model(), no_cls)
