"""weaktr's reference test-time procedure and reference-checkpoint loading against an
independent transcription of hustvl/WeakTr (tests/reference_transcription.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference_transcription import (
    DEIT_MEAN_255,
    DEIT_STD_255,
    RefSegmenter,
    deit_small_key_shapes,
    mmseg_resized_size,
    randomize,
    ref_crf_input,
    ref_crf_labels,
    ref_inference,
    ref_upsample_to_window,
    ref_window_anchors,
)
from weaktr_cli.dense_crf import label_from_probs
from weaktr_cli.errors import WeakTrError
from weaktr_cli.models.reference_segmenter import (
    detect_reference_segmenter,
    load_reference_segmenter,
    reference_variant,
)
from weaktr_cli.test_time import REFERENCE_RATIOS, fuse_layers, reference_layer_probs
from weaktr_cli.windows import reference_pass_sizes, window_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = tuple(m / 255 for m in DEIT_MEAN_255)
STD = tuple(s / 255 for s in DEIT_STD_255)


def test_voc_pass_sizes_of_a_500x375_image() -> None:
    # The reference's six multi-scale passes of a 500x375 VOC image (im_size 520, window 480):
    # mmseg resizes to short side 260..910, inference() raises the two below 480.
    expected_resized = [(260, 347), (390, 520), (520, 693), (650, 867), (780, 1040),
                        (910, 1213)]
    expected_fitted = [(480, 640), (480, 640), (520, 693), (650, 867), (780, 1040), (910, 1213)]
    for ratio, resized, fitted in zip(REFERENCE_RATIOS, expected_resized, expected_fitted,
                                      strict=True):
        assert mmseg_resized_size(375, 500, ratio, 520) == resized
        dummy = torch.zeros(1, 3, *resized)
        assert tuple(ref_upsample_to_window(dummy, 480).shape[2:]) == fitted
        assert reference_pass_sizes(375, 500, ratio, 520, 480) == (resized, fitted)
    # Portrait images keep the rule with the axes swapped.
    assert reference_pass_sizes(500, 375, 0.5, 520, 480) == ((347, 260), (640, 480))


def test_window_positions_match_the_reference() -> None:
    cases = {(480, 480): [0], (640, 480): [0, 160], (693, 480): [0, 213],
             (867, 480): [0, 320, 387], (1213, 480): [0, 320, 640, 733]}
    for (size, window), starts in cases.items():
        assert ref_window_anchors(size, window, 320) == starts
        assert window_starts(size, window, 320) == starts


def _tiny_reference(tmp_path, seed: int = 0, n_cls: int = 5):
    torch.manual_seed(seed)
    ref = randomize(RefSegmenter(n_cls=n_cls, image_size=32, patch=8, depth=2, dim=64), seed)
    ref.eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": ref.state_dict(), "n_cls": n_cls, "epoch": 3}, path)
    return ref, path


def test_tiny_reference_checkpoint_is_detected_and_loaded_strictly(tmp_path) -> None:
    ref, path = _tiny_reference(tmp_path)
    model, config = load_reference_segmenter(path)
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (64, 2, 1, 8)
    assert (config.img_size, config.n_cls, config.decoder_layers) == (32, 5, 2)
    assert model.encoder.norm.eps == 1e-5
    image = torch.randn(2, 3, 40, 52)  # padded to 40x56, pos-embed resampled (bilinear)
    with torch.no_grad():
        ours = model(image, return_layers=True)
        theirs = ref(image)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_reference_test_time_procedure_matches_the_transcription(tmp_path) -> None:
    ref, path = _tiny_reference(tmp_path, seed=1)
    model, _ = load_reference_segmenter(path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8)
    # im_size 35 and window 32 put the first two ratios below the window (upsampled), the
    # others above it (several windows), like 520 / 480 on VOC.
    fused_ref, sizes = ref_inference(ref, image, ratios=REFERENCE_RATIOS, flip=True, im_size=35,
                                     window=32, stride=21, mean255=DEIT_MEAN_255,
                                     std255=DEIT_STD_255)
    assert [s[0] for s in sizes[::2]] == [32, 32, 35, 43, 52, 61]
    layers = reference_layer_probs(model, image, ratios=REFERENCE_RATIOS, flip=True, im_size=35,
                                   window=32, stride=21, mean=MEAN, std=STD, layers=(0, 1),
                                   batch_size=3)
    fused = fuse_layers(layers, (0.8, 1.0))
    torch.testing.assert_close(fused, fused_ref, atol=2e-5, rtol=1e-5)
    assert float(fused.sum(0).mean()) == pytest.approx(1.8, abs=1e-4)  # un-normalised

    # The CRF input: the classes present in the argmax, their planes as they are.
    keys, planes = ref_crf_input(fused_ref)
    seen = {}

    def capture(img, probs, params):
        seen["probs"] = probs.copy()
        return np.zeros(probs.shape[1:], dtype=np.uint8)

    import weaktr_cli.dense_crf as crf

    original = crf.crf_from_probs
    crf.crf_from_probs = capture
    try:
        label_from_probs(fused.numpy(), image, "voc-test", renormalize=False)
    finally:
        crf.crf_from_probs = original
    np.testing.assert_allclose(seen["probs"], planes, atol=2e-5)
    assert len(keys) >= 2


def test_reference_crf_labels(tmp_path) -> None:
    pytest.importorskip("pydensecrf")
    ref, path = _tiny_reference(tmp_path, seed=2, n_cls=3)
    model, _ = load_reference_segmenter(path)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    kwargs = dict(ratios=(1.0,), flip=False, im_size=32, window=32, stride=21)
    fused_ref, _ = ref_inference(ref, image, mean255=DEIT_MEAN_255, std255=DEIT_STD_255,
                                 **kwargs)
    fused = fuse_layers(reference_layer_probs(model, image, mean=MEAN, std=STD, layers=(0, 1),
                                              **kwargs), (0.8, 1.0))
    for preset, gaussian, bilateral in (("voc-test", (3, 3), (83, 5, 3)),
                                        ("coco-test", (1, 3), (67, 3, 4))):
        expected = ref_crf_labels(image, fused_ref, gaussian=gaussian, bilateral=bilateral)
        got = label_from_probs(fused.numpy(), image, preset, renormalize=False)
        np.testing.assert_array_equal(got, expected)


def test_deit_small_key_set_loads_with_reference_shapes(tmp_path) -> None:
    shapes = deit_small_key_shapes()
    ref = RefSegmenter(n_cls=21, image_size=480, patch=16, depth=12, dim=384)
    # The transcription's modules give the same names and shapes as the spelled-out list.
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == shapes
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    config = detect_reference_segmenter(state)
    assert (config.embed_dim, config.depth, config.num_heads, config.img_size) == (384, 12, 6, 480)
    assert (config.n_cls, config.decoder_layers, config.mlp_ratio) == (21, 2, 4.0)
    randomize(ref, 3).eval()
    path = tmp_path / "deit_small.pth"
    torch.save({"model": ref.state_dict()}, path)
    model, _ = load_reference_segmenter(path)
    image = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        for a, b in zip(model(image, return_layers=True), ref(image), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_wrong_reference_checkpoints_fail_with_one_line(tmp_path) -> None:
    _, path = _tiny_reference(tmp_path)
    state = torch.load(path)["model"]
    broken = dict(state)
    del broken["decoder.blocks.1.mlp.fc2.bias"]
    torch.save({"model": broken}, tmp_path / "missing.pth")
    with pytest.raises(WeakTrError, match=r"missing key\(s\): decoder.blocks.1.mlp.fc2.bias"):
        load_reference_segmenter(tmp_path / "missing.pth")
    extra = dict(state)
    extra["decoder.extra_head.weight"] = torch.zeros(3)
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(WeakTrError, match=r"unexpected key\(s\): decoder.extra_head.weight"):
        load_reference_segmenter(tmp_path / "extra.pth")
    torch.save({"model": {"pos_embed": torch.zeros(1, 5, 4)}}, tmp_path / "cam.pth")
    with pytest.raises(WeakTrError, match="not a reference"):
        load_reference_segmenter(tmp_path / "cam.pth")
    with pytest.raises(WeakTrError, match="classes 5, not 21"):
        load_reference_segmenter(path, n_cls=21)


def test_variant_yml_beside_the_checkpoint(tmp_path) -> None:
    assert reference_variant(tmp_path / "checkpoint.pth") == {}
    (tmp_path / "variant.yml").write_text(
        "dataset_kwargs:\n  crop_size: 480\n  image_size: 520\n  normalization: vit\n"
        "inference_kwargs:\n  window_size: 480\n  window_stride: 320\n"
        "net_kwargs:\n  image_size: !!python/tuple\n  - 480\n  - 480\n  normalization: vit\n")
    assert reference_variant(tmp_path / "checkpoint.pth") == {
        "normalization": "vit", "window_size": 480, "window_stride": 320}


def test_reference_threshold_search_stops_at_the_first_non_improvement() -> None:
    from weaktr_cli.evaluation import reference_search

    # A curve with a dip after 0.42: the reference stops at 0.42; the full sweep finds 0.47.
    curve = [(0.30, 0.70), (0.40, 0.60), (0.41, 0.62), (0.42, 0.63), (0.43, 0.63),
             (0.44, 0.64), (0.47, 0.66), (0.50, 0.61)]
    assert reference_search(curve) == (0.42, 0.63)
    assert reference_search(curve, start=0.30) == (0.30, 0.70)
    assert reference_search(curve, start=0.44) == (0.47, 0.66)
    assert reference_search([(0.3, 0.5)]) is None


def test_random_query_fusion_and_fractional_reduction() -> None:
    from weaktr_cli.models.cam_vit import WeakTrCAM

    torch.manual_seed(0)
    model = WeakTrCAM("micro", 3, fusion="aaf-rand", aaf_reduction=1.5).eval()
    # 2 layers x 2 heads = 4 maps, int(4 / 1.5) = 2 hidden units (the reference's int(K / r)).
    assert model.fusion.head_ffn[0].weight.shape == (2, 4)
    assert "fusion.query" in model.state_dict()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(images, with_maps=True).head_weights
        second = model(torch.randn(2, 3, 32, 32), with_maps=True).head_weights
    # The weights never see the image: the same for every image and batch.
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first[0], first[1])
    rebuilt = WeakTrCAM.from_config(model.config())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.fusion.query, model.fusion.query)


def test_cam_schedule_stepped_per_epoch_as_the_reference() -> None:
    import math

    from weaktr_cli.cam_training_options import build_cam_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    base = 4e-4 * 64 / 512
    optimizer = torch.optim.AdamW([param], lr=base)
    scheduler = build_cam_scheduler(optimizer, epochs=60, steps_per_epoch=10, warmup_epochs=5,
                                    warmup_lr=1e-6, min_lr=1e-5, unit="epoch")

    def reference_lr(t: int) -> float:  # timm 0.5.4 CosineLRScheduler, warmup_prefix False
        if t < 5:
            return 1e-6 + t * (base - 1e-6) / 5
        return 1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * t / 60))

    lrs = []
    for epoch in range(60):
        lrs.append(optimizer.param_groups[0]["lr"])  # what this epoch trains at
        scheduler.step(epoch)  # after the epoch (main.py:380)
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-6)
    for epoch in range(1, 60):
        assert lrs[epoch] == pytest.approx(reference_lr(epoch - 1), rel=1e-9)


def test_cam_weight_decay_policies() -> None:
    from weaktr_cli.cam_training_options import build_cam_optimizer
    from weaktr_cli.models.cam_vit import WeakTrCAM

    model = WeakTrCAM("micro", 3)
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(policy: str) -> set[str]:
        opt = build_cam_optimizer(model, lr=1e-3, weight_decay=0.05, policy=policy)
        return {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0
                for p in g["params"]}

    everything = set(names.values())
    assert decayed("all") == everything
    filtered = decayed("exempt-1d")
    assert "cls_token" in filtered and "pos_embed" in filtered
    assert not any(n.endswith(".bias") or "norm" in n for n in filtered)
    assert decayed("exempt-1d-tokens") == filtered - {"cls_token", "pos_embed"}


def test_timm_cam_transform_is_timms_factory() -> None:
    from weaktr_cli.cam_training_options import timm_cam_transform

    torch.manual_seed(0)
    transform = timm_cam_transform(32)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_minmax_epsilon_and_amp_precision() -> None:
    from weaktr_cli.cams import normalize_maps
    from weaktr_cli.runtime import resolve_precision

    # A weak map (range 1e-3): the reference's 1e-8 still reaches ~1, weaktr's 1e-5 0.99.
    weak = torch.tensor([[[0.0, 1e-3]]])
    assert float(normalize_maps(weak.clone(), 1e-8).max()) == pytest.approx(1.0, abs=1e-4)
    assert float(normalize_maps(weak.clone()).max()) == pytest.approx(1e-3 / (1e-3 + 1e-5))
    # amp-fp16: fp16 autocast where CUDA is, fp32 on the CPU (the reference's torch.cuda.amp).
    assert resolve_precision("amp-fp16", torch.device("cpu"), training=True) == "fp32"
    assert resolve_precision("amp-fp16", torch.device("cuda"), training=True) == "fp16"
