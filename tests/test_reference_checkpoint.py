"""Official WeakTr checkpoint layouts load into WeakTrCAM and give the reference's CAMs.

The reference forward below is written from the layout description (docs/method.md and
`weaktr_cli/models/reference.py`) with plain torch ops on the raw reference state dict: C class
tokens, DINO-style pos-embed interpolation, einsum attention, no final norm, conv CAM head,
attention maps stacked head-major, AAF (v1/v2: pooled maps; v3: pooled attention outputs).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from weaktr_cli.errors import WeakTrError
from weaktr_cli.models import convert_reference_state_dict, load_reference_checkpoint
from weaktr_cli.models.reference import head_major_to_layer_major

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # restored after each test

# a tiny config: the layout, not the size, is what matters
C, DIM, DEPTH, HEADS, PATCH, GRID = 3, 32, 3, 2, 8, 4
AAF = "adaptive_attention_fusion."


def reference_state(
    layout: str,
    *,
    num_classes: int = C,
    dim: int = DIM,
    depth: int = DEPTH,
    heads: int = HEADS,
    patch: int = PATCH,
    grid: int = GRID,
    reduction: int = 2,
    feat_reduction: int = 4,
    w1_std: float = 0.25,
    feat_bias: float = 0.0,
    random: bool = True,
) -> dict[str, Tensor]:
    """A state dict in the reference's key layout ("v1", "v2" or "v3")."""
    gen = torch.Generator().manual_seed(7)

    def t(*shape: int, std: float = 0.3) -> Tensor:
        if not random:
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * std

    k, hd = depth * heads, dim // heads
    sd = {
        "cls_token": t(1, num_classes, dim, std=1.0),
        "pos_embed": t(1, num_classes + grid * grid, dim, std=1.0),
        "patch_embed.proj.weight": t(dim, 3, patch, patch, std=0.1),
        "patch_embed.proj.bias": t(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + t(dim, std=0.1),
            p + "norm1.bias": t(dim, std=0.1),
            p + "attn.qkv.weight": t(3 * dim, dim),
            p + "attn.qkv.bias": t(3 * dim, std=0.1),
            p + "attn.proj.weight": t(dim, dim, std=0.2),
            p + "attn.proj.bias": t(dim, std=0.1),
            p + "norm2.weight": 1 + t(dim, std=0.1),
            p + "norm2.bias": t(dim, std=0.1),
            p + "mlp.fc1.weight": t(4 * dim, dim, std=0.2),
            p + "mlp.fc1.bias": t(4 * dim, std=0.1),
            p + "mlp.fc2.weight": t(dim, 4 * dim, std=0.1),
            p + "mlp.fc2.bias": t(dim, std=0.1),
        }
    sd |= {
        "norm.weight": 1 + t(dim),  # defined by the reference, never applied
        "norm.bias": t(dim),
        "head.weight": t(num_classes, dim, 3, 3, std=0.1),
        "head.bias": t(num_classes, std=0.1),
    }
    stem = "fc" if layout == "v1" else "attn_head_ffn"
    # fusion weights: positive pooled inputs (maps, or feature scores shifted by the bias below)
    # times positive W1 keep the ReLU open; w1_std scales hidden units to O(1), so the sigmoid
    # outputs spread over (0, 1) without saturating and every map's weight matters
    sd[f"{AAF}{stem}.0.weight"] = t(k // reduction, k, std=w1_std).abs()
    sd[f"{AAF}{stem}.2.weight"] = t(k, k // reduction, std=1.0)
    if layout == "v3":
        fh = hd // feat_reduction
        sd |= {
            AAF + "attn_feat_ffn.0.weight": t(fh, hd, std=0.3),
            AAF + "attn_feat_ffn.0.bias": t(fh, std=0.1),
            AAF + "attn_feat_ffn.1.weight": t(1, fh, std=0.3),
            AAF + "attn_feat_ffn.1.bias": t(1, std=0.1) + feat_bias,
        }
    return sd


def reference_forward(
    sd: dict[str, Tensor], x: Tensor, layout: str, pool: str
) -> dict[str, Tensor]:
    """The reference WeakTr forward, re-derived with plain ops on the raw state dict."""
    c = sd["cls_token"].shape[1]
    dim = sd["cls_token"].shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    stem = "fc" if layout == "v1" else "attn_head_ffn"
    heads = sd[f"{AAF}{stem}.0.weight"].shape[1] // depth
    hd = dim // heads
    b, _, height, width = x.shape

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    gh, gw = x.shape[-2:]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    n0 = sd["pos_embed"].shape[1] - c
    g0 = int(math.sqrt(n0))
    if gh * gw == n0 and height == width:
        pos = sd["pos_embed"]
    else:  # DINO-style interpolation with the +0.1 scale factor
        patch_pos = sd["pos_embed"][:, c:].reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic"
        )
        pos = torch.cat(
            [sd["pos_embed"][:, :c], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1
        )
    x = x + pos

    attns, feats = [], []
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = torch.einsum("bnd,ed->bne", h, sd[p + "attn.qkv.weight"]) + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = (torch.einsum("bhnd,bhmd->bhnm", q, k) * hd**-0.5).softmax(-1)
        o = torch.einsum("bhnm,bhmd->bnhd", attn, v).reshape(b, -1, dim)
        o = o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + o
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        attns.append(attn)
        feats.append(o)

    token = x[:, :c].mean(-1)
    patches = x[:, c:].transpose(1, 2).reshape(b, dim, gh, gw)
    coarse = F.conv2d(patches, sd["head.weight"], sd["head.bias"], padding=1)

    maps = torch.stack(attns).permute(1, 2, 0, 3, 4).reshape(b, heads * depth, *attns[0].shape[-2:])
    if layout == "v3":
        f = torch.stack(feats).reshape(depth, b, -1, hd, heads)  # channel j * heads + h -> head h
        f = f.permute(1, 4, 0, 2, 3).reshape(b, heads * depth, -1, hd)
        pooled = f.amax(2) if pool == "max" else f.mean(2)
        z = pooled @ sd[AAF + "attn_feat_ffn.0.weight"].T + sd[AAF + "attn_feat_ffn.0.bias"]
        z = (z @ sd[AAF + "attn_feat_ffn.1.weight"].T + sd[AAF + "attn_feat_ffn.1.bias"])[..., 0]
    else:
        z = maps.amax((-2, -1)) if pool == "max" else maps.mean((-2, -1))
    hidden = F.relu(z @ sd[f"{AAF}{stem}.0.weight"].T)
    weights = torch.sigmoid(hidden @ sd[f"{AAF}{stem}.2.weight"].T)
    fused = (maps * weights[:, :, None, None]).mean(1)
    cams = fused[:, :c, c:].reshape(b, c, gh, gw) * F.relu(coarse)
    fine = torch.einsum("bpq,bcq->bcp", fused[:, c:, c:], cams.flatten(2)).reshape(b, c, gh, gw)
    return {"token": token, "coarse": coarse, "cams": cams, "fine": fine}


# (layout, pool, W1 std, feature-score bias), chosen so the fusion weights are non-degenerate:
# avg-pooled maps are 1/N ~ 0.05, max-pooled ~ 0.9; raw feature scores ~ -4.5 (max), -0.5 (avg)
CASES = [
    ("v1", "avg", 4.0, 0.0),
    ("v1", "max", 0.25, 0.0),
    ("v2", "max", 0.25, 0.0),
    ("v3", "max", 0.1, 8.0),
    ("v3", "avg", 0.1, 3.0),
]


@pytest.mark.parametrize(("layout", "pool", "w1_std", "feat_bias"), CASES)
def test_converted_checkpoint_reproduces_reference_cams(
    tmp_path: Path, layout: str, pool: str, w1_std: float, feat_bias: float
) -> None:
    sd = reference_state(layout, w1_std=w1_std, feat_bias=feat_bias)
    path = tmp_path / "checkpoint_best_mIoU.pth"
    # the reference saves its mIoU as a numpy float next to the weights
    torch.save({"model": sd, "epoch": 59, "miou": np.float64(69.4)}, path)
    model = load_reference_checkpoint(path, aaf_pool=pool).double()
    assert not model.training
    assert model.fusion_name == ("aaf-feat" if layout == "v3" else "aaf")
    sd64 = {k: v.double() for k, v in sd.items()}
    torch.manual_seed(0)
    for size in [(32, 32), (44, 60), (70, 41)]:  # stored grid; non-square, non-multiples
        images = torch.randn(2, 3, *size, dtype=torch.float64)
        ref = reference_forward(sd64, images, layout, pool)
        with torch.no_grad():
            out = model(images, with_maps=True)
        torch.testing.assert_close(out.token_logits, ref["token"])
        torch.testing.assert_close(out.coarse_cam, ref["coarse"])
        torch.testing.assert_close(out.cross_cam, ref["cams"])
        torch.testing.assert_close(out.fine_cam, ref["fine"])
        assert ref["fine"].abs().amax() > 0
        weights = out.head_weights
        assert weights is not None and weights.std() > 0.05  # non-degenerate fusion weights


def test_layer_order_permutation_matters() -> None:
    # without the head-major -> layer-major permutation the fused CAM would differ
    perm = head_major_to_layer_major(DEPTH, HEADS)
    assert perm.tolist() == [0, 3, 1, 4, 2, 5]
    sd = reference_state("v3")
    converted, fusion, config = convert_reference_state_dict(sd)
    assert fusion == "aaf-feat" and config.layout == "v3"
    w = sd[AAF + "attn_head_ffn.0.weight"]
    assert not torch.equal(converted["fusion.head_ffn.0.weight"], w)
    assert torch.equal(converted["fusion.head_ffn.0.weight"][:, 1], w[:, 3])  # layer 0, head 1


def test_detected_config() -> None:
    _, fusion, config = convert_reference_state_dict(reference_state("v1"))
    assert (fusion, config.layout, config.pool) == ("aaf", "v1", "avg")
    assert config.arch.name == "reference-custom"
    assert (config.arch.embed_dim, config.arch.depth, config.arch.num_heads) == (DIM, DEPTH, HEADS)
    assert (config.arch.patch_size, config.arch.img_size, config.num_classes) == (8, 32, C)
    assert config.aaf_reduction == 2
    _, fusion, config = convert_reference_state_dict(reference_state("v3"))
    assert (fusion, config.pool, config.aaf_feat_reduction) == ("aaf-feat", "max", 4)


def test_release_sized_v3_layout_maps_onto_deit_small() -> None:
    # the released VOC checkpoint: DeiT-S, 20 classes, r = 8 (hidden 9), 64 -> 8 feature FFN
    sd = reference_state(
        "v3", num_classes=20, dim=384, depth=12, heads=6, patch=16, grid=14,
        reduction=8, feat_reduction=8, random=False,
    )  # fmt: skip
    converted, fusion, config = convert_reference_state_dict(
        {"module." + k: v for k, v in sd.items()}
    )
    assert config.arch.name == "deit-small" and fusion == "aaf-feat"
    assert (config.aaf_reduction, config.aaf_feat_reduction, config.num_classes) == (8, 8, 20)
    assert converted["fusion.head_ffn.0.weight"].shape == (9, 72)
    assert converted["fusion.feat_ffn.0.weight"].shape == (8, 64)
    assert not any(k.startswith("norm.") for k in converted)


def _save(tmp_path: Path, sd: dict[str, Tensor]) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    return path


def test_missing_key_is_named(tmp_path: Path) -> None:
    sd = reference_state("v3")
    del sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(
        WeakTrError, match=r"1 missing key\(s\): backbone\.blocks\.1\.attn\.qkv\.weight"
    ):
        load_reference_checkpoint(_save(tmp_path, sd))


def test_unknown_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    sd = reference_state("v2")
    sd["blocks.0.attn.relative_bias"] = torch.zeros(3)
    sd[AAF + "query"] = torch.zeros(1, 6)
    with pytest.raises(WeakTrError) as err:
        load_reference_checkpoint(_save(tmp_path, sd))
    assert "2 unexpected key(s)" in str(err.value)
    assert "adaptive_attention_fusion.query" in str(err.value)
    assert "blocks.0.attn.relative_bias" in str(err.value)

    sd = reference_state("v2")
    sd["head.bias"] = torch.zeros(C + 1)
    with pytest.raises(WeakTrError, match=r"shape mismatch\(es\): head\.bias \[4\] vs model \[3\]"):
        load_reference_checkpoint(_save(tmp_path, sd))


def test_wrong_kind_of_checkpoint(tmp_path: Path) -> None:
    sd = reference_state("v1")
    with pytest.raises(WeakTrError, match="has 3 classes, the dataset has 20"):
        load_reference_checkpoint(_save(tmp_path, sd), num_classes=20)
    imagenet = {k: v for k, v in sd.items() if not k.startswith(AAF)}
    imagenet["head.weight"] = torch.zeros(1000, DIM)
    with pytest.raises(WeakTrError, match="not a conv kernel"):
        load_reference_checkpoint(_save(tmp_path, imagenet))
    no_fusion = {k: v for k, v in sd.items() if not k.startswith(AAF)}
    with pytest.raises(WeakTrError, match="no adaptive_attention_fusion weights"):
        load_reference_checkpoint(_save(tmp_path, no_fusion))
