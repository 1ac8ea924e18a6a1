"""Gradient clipping loss against a slow per-pixel reference written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weaktr_cli.errors import WeakTrError
from weaktr_cli.losses import ClipLossResult, gradient_clipping_loss, plain_ce_loss

IGNORE = 255


def reference_clip_loss(
    logits: list, target: list, tau: float, size: int
) -> tuple[float, float, list, list]:
    """docs/method.md's rule, pixel by pixel, on nested lists (B, C, H, W) and (B, H, W).

    Returns (loss, global mean, kept flags (B, H, W), per-pixel gradient weight (B, H, W)):
    weight 1 where the pixel's CE gradient flows, 0 where it is clipped or ignored.
    """
    b_n, c_n = len(logits), len(logits[0])
    h_n, w_n = len(logits[0][0]), len(logits[0][0][0])
    n = b_n * h_n * w_n
    loss = [[[0.0] * w_n for _ in range(h_n)] for _ in range(b_n)]
    for b in range(b_n):
        for y in range(h_n):
            for x in range(w_n):
                t = target[b][y][x]
                if t == IGNORE:
                    continue
                scores = [logits[b][c][y][x] for c in range(c_n)]
                top = max(scores)
                lse = top + math.log(sum(math.exp(s - top) for s in scores))
                loss[b][y][x] = lse - scores[t]
    g = sum(loss[b][y][x] for b in range(b_n) for y in range(h_n) for x in range(w_n)) / n

    thr = [[math.inf] * w_n for _ in range(h_n)]
    if g <= tau:
        for y0 in range(0, h_n, size):
            for x0 in range(0, w_n, size):
                ys = range(y0, min(y0 + size, h_n))
                xs = range(x0, min(x0 + size, w_n))
                total = 0.0
                count = 0
                for y in ys:
                    for x in xs:
                        # batch mean at this pixel, ignored pixels as zeros
                        total += sum(loss[b][y][x] for b in range(b_n)) / b_n
                        count += 1
                local = total / count
                for y in ys:
                    for x in xs:
                        thr[y][x] = max(local, g)

    total = 0.0
    kept = [[[False] * w_n for _ in range(h_n)] for _ in range(b_n)]
    weight = [[[0.0] * w_n for _ in range(h_n)] for _ in range(b_n)]
    for b in range(b_n):
        for y in range(h_n):
            for x in range(w_n):
                value = loss[b][y][x]
                if value > thr[y][x]:
                    total += thr[y][x]
                else:
                    total += value
                    if target[b][y][x] != IGNORE:
                        kept[b][y][x] = True
                        weight[b][y][x] = 1.0
    return total / n, g, kept, weight


def make_case(seed: int, b: int, c: int, h: int, w: int, ignore_frac: float):
    gen = torch.Generator().manual_seed(seed)
    # float64 so that threshold comparisons agree with the float reference
    logits = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * 2.0
    target = torch.randint(0, c, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < ignore_frac] = IGNORE
    return logits, target


def plain_mean(logits: torch.Tensor, target: torch.Tensor) -> float:
    return plain_ce_loss(logits, target).global_mean.item()


def check_against_reference(logits, target, tau, size):
    ref_loss, ref_g, ref_kept, ref_weight = reference_clip_loss(
        logits.tolist(), target.tolist(), tau, size
    )
    leaf = logits.clone().requires_grad_(True)
    out = gradient_clipping_loss(leaf, target, tau=tau, patch_size=size, ignore_index=IGNORE)
    assert isinstance(out, ClipLossResult)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    assert out.global_mean.item() == pytest.approx(ref_g, rel=1e-9)
    kept = torch.tensor(ref_kept)
    assert torch.equal(out.kept_mask, kept)
    valid = target != IGNORE
    n_valid = int(valid.sum())
    expected_fraction = (n_valid - int(kept.sum())) / max(n_valid, 1)
    assert out.clipped_fraction.item() == pytest.approx(expected_fraction)

    # gradients: kept pixels get plain CE gradients / N, clipped and ignored pixels exactly 0
    out.loss.backward()
    plain = logits.clone().requires_grad_(True)
    per_pixel = torch.nn.functional.cross_entropy(
        plain, target, ignore_index=IGNORE, reduction="none"
    )
    (per_pixel.sum() / per_pixel.numel()).backward()
    weight = torch.tensor(ref_weight, dtype=logits.dtype).unsqueeze(1)
    torch.testing.assert_close(leaf.grad, plain.grad * weight, rtol=1e-9, atol=1e-15)
    clipped = valid & ~kept
    assert torch.all(leaf.grad.permute(0, 2, 3, 1)[clipped] == 0)
    assert torch.all(leaf.grad.permute(0, 2, 3, 1)[~valid] == 0)
    return out


@pytest.mark.parametrize(
    ("b", "h", "w", "size"),
    [(2, 8, 12, 4), (3, 10, 7, 4), (1, 5, 5, 4), (2, 9, 9, 3), (2, 6, 6, 120)],
)
def test_clipping_active_matches_reference(b, h, w, size):
    logits, target = make_case(seed=h * 100 + w, b=b, c=4, h=h, w=w, ignore_frac=0.2)
    tau = plain_mean(logits, target) * 1.5  # tau above the global mean: clipping on
    out = check_against_reference(logits, target, tau, size)
    # random logits have large per-pixel spread: something must have been clipped
    assert out.clipped_fraction.item() > 0


@pytest.mark.parametrize(("h", "w", "size"), [(8, 8, 4), (7, 10, 4)])
def test_above_tau_is_plain_mean(h, w, size):
    logits, target = make_case(seed=7, b=2, c=3, h=h, w=w, ignore_frac=0.3)
    g = plain_mean(logits, target)
    out = check_against_reference(logits, target, tau=g * 0.5, size=size)
    assert out.clipped_fraction.item() == 0
    assert out.loss.item() == pytest.approx(g)
    assert torch.equal(out.kept_mask, target != IGNORE)


def test_partial_patches_use_their_own_pixels():
    # One row of losses l = CE(margin v) for v = [0, 3, 0, -3, -4], S = 2: patches {0, 1},
    # {2, 3} and {4}. g = 1.70; patch {2, 3} has mean 1.87 and clips pixel 3 (3.05); the lone
    # pixel 4 is its own patch, its threshold is its own loss, and a tie keeps the gradient.
    logits = torch.zeros(1, 2, 1, 5, dtype=torch.float64)
    logits[0, 0, 0] = torch.tensor([0.0, 3.0, 0.0, -3.0, -4.0])
    target = torch.zeros(1, 1, 5, dtype=torch.long)
    out = gradient_clipping_loss(logits, target, tau=100.0, patch_size=2)
    assert out.kept_mask.tolist() == [[[True, True, True, False, True]]]
    check_against_reference(logits, target, tau=100.0, size=2)


def test_ignored_pixels_count_as_zero_in_local_means():
    # S = 2 on a 2 x 4 map. Left patch: two valid pixels with loss 2.13, two ignored, so its
    # local mean is 4.25 / 4 = 1.06 (ignored counted as 0) and both valid pixels are clipped;
    # counting only valid pixels would give 2.13 and keep them. Right patch: loss 0.13 each,
    # threshold g = 0.60, all kept.
    logits = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    logits[0, 1] = torch.tensor([[2.0, 2.0, -2.0, -2.0], [0.0, 0.0, -2.0, -2.0]])
    target = torch.tensor([[[0, 0, 0, 0], [IGNORE, IGNORE, 0, 0]]])
    out = gradient_clipping_loss(logits, target, tau=100.0, patch_size=2)
    assert out.kept_mask.tolist() == [[[False, False, True, True], [False, False, True, True]]]
    assert out.clipped_fraction.item() == pytest.approx(2 / 6)
    check_against_reference(logits, target, tau=100.0, size=2)


def test_tau_equal_to_global_mean_clips():
    # "g > tau" is strict: at g == tau clipping is already on.
    logits, target = make_case(seed=11, b=2, c=3, h=6, w=6, ignore_frac=0.1)
    g = plain_mean(logits, target)
    assert gradient_clipping_loss(logits, target, tau=g, patch_size=3).clipped_fraction > 0
    assert gradient_clipping_loss(logits, target, tau=g * 0.999, patch_size=3).clipped_fraction == 0


def test_all_ignored_gives_zero_loss():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.full((2, 4, 4), IGNORE)
    out = gradient_clipping_loss(logits, target, patch_size=2)
    assert out.loss.item() == 0
    assert out.clipped_fraction.item() == 0
    assert not out.kept_mask.any()


def test_half_precision_logits_are_upcast():
    logits, target = make_case(seed=3, b=2, c=3, h=6, w=6, ignore_frac=0.1)
    ref = gradient_clipping_loss(logits, target, tau=10.0, patch_size=4)
    half = gradient_clipping_loss(logits.to(torch.bfloat16), target, tau=10.0, patch_size=4)
    assert half.loss.dtype == torch.float32
    assert half.loss.item() == pytest.approx(ref.loss.item(), rel=0.05)


def test_plain_ce_loss_result():
    logits, target = make_case(seed=5, b=2, c=3, h=5, w=6, ignore_frac=0.25)
    out = plain_ce_loss(logits, target)
    per_pixel = torch.nn.functional.cross_entropy(
        logits, target, ignore_index=IGNORE, reduction="none"
    )
    assert out.loss.item() == pytest.approx(per_pixel.mean().item())  # ignored pixels count 0
    assert out.clipped_fraction.item() == 0
    assert torch.equal(out.kept_mask, target != IGNORE)


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(WeakTrError, match="patch size"):
        gradient_clipping_loss(logits, torch.zeros(1, 4, 4, dtype=torch.long), patch_size=0)
    with pytest.raises(WeakTrError, match="do not match"):
        gradient_clipping_loss(logits, torch.zeros(1, 4, 5, dtype=torch.long))


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(2, 4),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    size=st.integers(1, 6),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.9]),
    tau_scale=st.sampled_from([0.5, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(b, c, h, w, size, ignore_frac, tau_scale, seed):
    logits, target = make_case(seed, b, c, h, w, ignore_frac)
    tau = plain_mean(logits, target) * tau_scale
    check_against_reference(logits, target, tau, size)
