"""Online retraining (Phase 4): checkpoint, exact resume, seed sources, errors, diagnostics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from weaktr_cli.artifacts import ArtifactWriter, new_meta, open_artifact
from weaktr_cli.data.base import IGNORE_INDEX, SegmentationDataset
from weaktr_cli.errors import WeakTrError
from weaktr_cli.retrain import (
    RETRAIN_RECIPES,
    RetrainConfig,
    SeedSource,
    augment,
    load_segmenter,
    poly_lr,
    retrain,
)
from weaktr_cli.seeds import ambiguous_seed_pixels, cams_to_label, make_seeds
from weaktr_cli.training import TrainingOptions

H, W = 36, 44
CPU = TrainingOptions("cpu")
CPU_RESUME = TrainingOptions("cpu", resume=True)


class MaskedTiny(SegmentationDataset):
    """Images with two coloured boxes (classes 1 and 2) on grey noise, with exact masks."""

    name = "masked-tiny"
    class_names = ("background", "red", "blue")

    def __init__(self, n: int = 6) -> None:
        self.split = "train"
        self.ids = [f"m{i}" for i in range(n)]

    def _boxes(self, image_id: str) -> list[tuple[int, int, int, int, int]]:
        rng = np.random.default_rng(self.ids.index(image_id))
        boxes = []
        for cls, x_lo in ((1, 2), (2, 24)):
            y0, x0 = int(rng.integers(2, 18)), int(rng.integers(x_lo, x_lo + 6))
            boxes.append((cls, y0, y0 + 12, x0, x0 + 12))
        return boxes

    def load_image(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng([7, self.ids.index(image_id)])
        image = rng.normal(110, 10, size=(H, W, 3))
        for cls, y0, y1, x0, x1 in self._boxes(image_id):
            image[y0:y1, x0:x1] = (220, 40, 40) if cls == 1 else (40, 60, 220)
        return np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))

    def load_mask(self, image_id: str) -> np.ndarray:
        mask = np.zeros((H, W), np.uint8)
        for cls, y0, y1, x0, x1 in self._boxes(image_id):
            mask[y0:y1, x0:x1] = cls
        mask[0, :] = IGNORE_INDEX  # some ignored ground truth
        return mask

    def image_labels(self, image_id: str) -> np.ndarray:
        return np.array([1, 2], dtype=np.int64)

    @property
    def has_masks(self) -> bool:
        return True


def write_seeds(path: Path, dataset: SegmentationDataset, *, sizes: dict | None = None,
                extra_ids: tuple[str, ...] = ()) -> Path:
    """Noisy seeds: the ground truth with its boxes shifted by 2 px and a few ignored pixels."""
    meta = new_meta("labels", dataset.name, dataset.split, dataset.class_names)
    with ArtifactWriter(path, meta, resume=False) as writer:
        for image_id in [*dataset.ids, *extra_ids]:
            if image_id in extra_ids:
                writer.write_labels(image_id, np.zeros((H, W), np.uint8))
                continue
            mask = dataset.load_mask(image_id)
            seed = np.roll(np.where(mask == IGNORE_INDEX, 0, mask), 2, axis=1).astype(np.uint8)
            seed[-1, :5] = IGNORE_INDEX
            if sizes and image_id in sizes:
                seed = np.zeros(sizes[image_id], np.uint8)
            writer.write_labels(image_id, seed)
        return writer.finalize()


def write_cams(path: Path, dataset: MaskedTiny) -> Path:
    """A ``cams`` artifact: per image a smooth bump per box (classes 1 and 2), in [0, 1]."""
    meta = new_meta("cams", dataset.name, dataset.split, dataset.class_names)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    with ArtifactWriter(path, meta, resume=False) as writer:
        for image_id in dataset.ids:
            maps = [np.exp(-(((y - (y0 + y1) / 2) / 6) ** 2 + ((x - (x0 + x1) / 2) / 7) ** 2))
                    for _, y0, y1, x0, x1 in dataset._boxes(image_id)]
            writer.write_cams(image_id, np.array([2, 1]), np.stack(maps[::-1]))
        return writer.finalize()


class OtherClasses(MaskedTiny):
    name = "other"
    class_names = ("background", "cat", "dog")


def tiny_config(**kw) -> RetrainConfig:
    base = RetrainConfig(arch="micro", crop_size=32, scale_range=(0.8, 1.2), batch_size=2,
                         iterations=6, optimizer="adamw", lr=1e-3, clip_patch=16, log_every=2,
                         seed=3)
    return dataclasses.replace(base, **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[MaskedTiny, Path]:
    dataset = MaskedTiny()
    return dataset, write_seeds(tmp_path_factory.mktemp("seeds") / "seeds.h5", dataset)


def test_retrain_writes_loadable_checkpoint(data, tmp_path):
    dataset, seeds = data
    out = tmp_path / "seg.ckpt"
    result = retrain(dataset, seeds, out, tiny_config(),
                     options=TrainingOptions("cpu", log_jsonl=tmp_path / "log.jsonl"))
    assert result.checkpoint == out and result.steps == 6
    model, meta = load_segmenter(out)
    assert meta["kind"] == "segmenter" and meta["class_names"] == list(dataset.class_names)
    assert meta["train"]["arch"] == "micro" and meta["tau"] == 1.2
    assert meta["seeds"]["kind"] == "labels" and meta["num_images"] == len(dataset)
    assert "images_per_s" not in meta["final"]  # timings never enter the checkpoint
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 20, 28))
    assert logits.shape == (1, 3, 20, 28)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert 0 <= r["clipped_fraction"] <= 1 and r["lr"] > 0 and r["tau"] == 1.2
        assert 0 <= r["kept_precision"] <= 1  # the dataset has masks: Fig. 5 diagnostic
    assert records == result.history


def test_linear_decoder_checkpoint_round_trip(data, tmp_path):
    dataset, seeds = data
    retrain(dataset, seeds, tmp_path / "lin.ckpt", tiny_config(decoder="linear", iterations=2),
            options=CPU)
    model, meta = load_segmenter(tmp_path / "lin.ckpt")
    assert meta["model"]["decoder"] == "linear" and model.decoder_kind == "linear"
    assert model.num_decoder_layers == 1


def test_resume_continues_exactly(data, tmp_path):
    # 6 steps in one go, and 4 steps + a resumed 2, give byte-identical checkpoints: this is
    # both the determinism guarantee (same seed, CPU) and the resume guarantee.
    dataset, seeds = data
    config = tiny_config(save_every=2, tau=0.3)
    straight = retrain(dataset, seeds, tmp_path / "a.ckpt", config, options=CPU)
    retrain(dataset, seeds, tmp_path / "b.ckpt", dataclasses.replace(config, max_steps=4),
            options=CPU)
    assert load_segmenter(tmp_path / "b.ckpt")[1]["step"] == 4
    resumed = retrain(dataset, seeds, tmp_path / "b.ckpt", config, options=CPU_RESUME)
    assert resumed.steps == 6
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "images_per_s"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "images_per_s"}
                     for r in resumed.history]


def test_resume_errors(data, tmp_path):
    dataset, seeds = data
    with pytest.raises(WeakTrError, match="no training state"):
        retrain(dataset, seeds, tmp_path / "x.ckpt", tiny_config(), options=CPU_RESUME)
    retrain(dataset, seeds, tmp_path / "x.ckpt", tiny_config(max_steps=2), options=CPU)
    with pytest.raises(WeakTrError, match=r"other settings \(lr\)"):
        retrain(dataset, seeds, tmp_path / "x.ckpt", tiny_config(lr=0.1), options=CPU_RESUME)


def test_no_clip_and_forced_clip(data, tmp_path):
    dataset, seeds = data
    plain = retrain(dataset, seeds, tmp_path / "p.ckpt", tiny_config(clip=False), options=CPU)
    assert plain.tau is None
    assert all(r["clipped_fraction"] == 0 and r["clip_active"] == 0 for r in plain.history)
    # tau far above any loss: clipping is on from the first step and drops some pixels.
    forced = retrain(dataset, seeds, tmp_path / "c.ckpt", tiny_config(tau=50.0), options=CPU)
    assert all(r["clip_active"] == 1 for r in forced.history)
    assert all(r["clipped_fraction"] > 0 for r in forced.history)
    assert all(r["clipped_precision"] is not None for r in forced.history)


def test_tau_auto_is_measured_logged_and_stored(data, tmp_path):
    dataset, seeds = data
    config = tiny_config(tau="auto", tau_auto_steps=2, tau_auto_fraction=0.5)
    lines: list[str] = []
    result = retrain(dataset, seeds, tmp_path / "t.ckpt", config,
                     options=TrainingOptions("cpu", log=lines.append))
    first = result.history[0]
    # Steps 1-2 are the warm-up: unclipped; tau = 0.5 x the loss of step 2 (its second half).
    assert first["clip_active"] == 0 and first["tau"] is not None
    assert result.tau == pytest.approx(first["tau"]) and 0 < result.tau < first["global_mean"]
    assert load_segmenter(tmp_path / "t.ckpt")[1]["tau"] == pytest.approx(result.tau)
    assert any(line.startswith("tau auto") for line in lines)


def test_seed_ids_must_be_in_the_dataset(tmp_path):
    dataset = MaskedTiny(4)
    seeds = write_seeds(tmp_path / "s.h5", dataset, extra_ids=("stranger",))
    with pytest.raises(WeakTrError, match=r"1 image.*not in dataset.*'stranger'"):
        retrain(dataset, seeds, tmp_path / "x.ckpt", tiny_config(), options=CPU)


def test_seed_size_must_equal_image_size(tmp_path):
    dataset = MaskedTiny(4)
    seeds = write_seeds(tmp_path / "s.h5", dataset, sizes={"m1": (20, 20)})
    with pytest.raises(WeakTrError, match=r"seeds of image 'm1' are 20x20 but the image is 36x44"):
        retrain(dataset, seeds, tmp_path / "x.ckpt", tiny_config(), options=CPU)


def test_seed_classes_must_match(tmp_path):
    dataset = MaskedTiny(4)
    seeds = write_seeds(tmp_path / "s.h5", OtherClasses(4))
    with pytest.raises(WeakTrError, match="classes"):
        retrain(dataset, seeds, tmp_path / "x.ckpt", tiny_config(), options=CPU)


def test_cams_seed_source_equals_cams_to_label(tmp_path):
    dataset = MaskedTiny(3)
    cams = write_cams(tmp_path / "cams.h5", dataset)
    with SeedSource(cams, bg=0.4) as source, open_artifact(cams) as reader:
        assert source.kind == "cams" and source.ids == dataset.ids
        for image_id in dataset.ids:
            expected = cams_to_label(reader.read_cams(image_id), 0.4)
            label = source.label(image_id)
            assert label.dtype == np.uint8 and np.array_equal(label, expected)
    with pytest.raises(WeakTrError, match="background threshold is needed"):
        SeedSource(cams)


def test_ambiguity_ignores_seed_pixels_the_cams_cannot_split(tmp_path):
    dataset = MaskedTiny(3)
    seeds = write_seeds(tmp_path / "s.h5", dataset)
    # class 1's CAM fires on both boxes (as a colour-only CAM would), class 2's on its own
    meta = new_meta("cams", dataset.name, dataset.split, dataset.class_names)
    with ArtifactWriter(tmp_path / "cams.h5", meta, resume=False) as writer:
        for image_id in dataset.ids:
            mask = dataset.load_mask(image_id)
            maps = np.stack([(mask == 1) | (mask == 2), mask == 2]).astype(np.float32)
            writer.write_cams(image_id, np.array([1, 2]), maps)
        cams = writer.finalize()
    with SeedSource(seeds) as plain, SeedSource(seeds, cams=cams, ambiguity=0.3) as masked, \
            open_artifact(cams) as reader:
        for image_id in dataset.ids:
            record = reader.read_cams(image_id)
            before, after = plain.label(image_id), masked.label(image_id)
            expected = before.copy()
            expected[ambiguous_seed_pixels(before, record, 0.3)] = IGNORE_INDEX
            assert np.array_equal(after, expected)
        assert (after == IGNORE_INDEX).sum() > (before == IGNORE_INDEX).sum()
        assert masked.describe()["ambiguity"] == 0.3 and "cams" in masked.describe()
    config = tiny_config(iterations=2, ambiguity=0.3)
    with pytest.raises(WeakTrError, match="needs the CAMs"):  # these seeds have no parent
        retrain(dataset, seeds, tmp_path / "x.ckpt", config, options=CPU)
    result = retrain(dataset, seeds, tmp_path / "x.ckpt", config, cams=cams, options=CPU)
    meta = load_segmenter(result.checkpoint)[1]
    assert meta["seeds"]["ambiguity"] == 0.3 and meta["train"]["ambiguity"] == 0.3
    with pytest.raises(WeakTrError, match="ambiguity ratio"):
        tiny_config(ambiguity=1.5).check()
    # seeds made by `crf` name their CAMs, so the CAMs need not be passed
    made = make_seeds(cams, dataset, tmp_path / "made.h5", bg=0.4, params=None)
    with SeedSource(made, ambiguity=0.3) as source:
        assert source.cams_path == cams.resolve()


def test_labels_seed_source_rejects_bg(data):
    _, seeds = data
    with pytest.raises(WeakTrError, match="only applies to CAMs"):
        SeedSource(seeds, bg=0.4)


def test_augment_shapes_padding_and_label_alignment():
    config = tiny_config(crop_size=32, scale_range=(0.5, 0.5), photometric=False, flip=False)
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255
    labels = np.zeros((2, 40, 40), np.uint8)
    labels[:, :, 20:] = 1
    img, lab = augment(image, labels, config, np.random.default_rng(0), (0, 0, 0), (1, 1, 1))
    assert img.shape == (3, 32, 32) and lab.shape == (2, 32, 32) and lab.dtype == torch.uint8
    # short side 0.5 x 32 = 16 px: the rest is padding (image 0, labels 255)
    assert (lab[:, 16:, :] == IGNORE_INDEX).all() and (lab[:, :, 16:] == IGNORE_INDEX).all()
    assert (img[:, 16:, :] == 0).all()
    # labels follow the pixels: white where label 1
    white = img[0, :16, :16] > 0.5
    assert torch.equal(white, lab[0, :16, :16] == 1)


def test_explicit_attention_matches_the_fused_kernel():
    from weaktr_cli.retrain import build_model, use_explicit_attention

    model = build_model(tiny_config(decoder="linear"), 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        use_explicit_attention(model)
        explicit = model(x)
    assert all(not block.attn.fused_attn for block in model.encoder.blocks)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)


def test_poly_lr_schedule():
    assert poly_lr(0, 100, 1e-4, 1e-5, 0.9) == pytest.approx(1e-4)
    assert poly_lr(100, 100, 1e-4, 1e-5, 0.9) == pytest.approx(1e-5)
    assert poly_lr(50, 100, 1e-4, 1e-5, 0.9) == pytest.approx(9e-5 * 0.5**0.9 + 1e-5)
    # linear warm-up over the first 10 steps, then the same poly curve
    assert poly_lr(0, 100, 1e-4, 1e-5, 0.9, warmup=10) == pytest.approx(1e-5)
    assert poly_lr(4, 100, 1e-4, 1e-5, 0.9, warmup=10) == pytest.approx(
        0.5 * poly_lr(4, 100, 1e-4, 1e-5, 0.9))
    assert poly_lr(50, 100, 1e-4, 1e-5, 0.9, warmup=10) == poly_lr(50, 100, 1e-4, 1e-5, 0.9)


def test_config_errors():
    with pytest.raises(WeakTrError, match="unknown architecture"):
        RetrainConfig(arch="nope").check()
    with pytest.raises(WeakTrError, match="invalid tau"):
        RetrainConfig(tau="sometimes").check()
    with pytest.raises(WeakTrError, match="scale range"):
        RetrainConfig(scale_range=(2.0, 1.0)).check()
    with pytest.raises(WeakTrError, match="unknown decoder"):
        RetrainConfig(decoder="conv").check()
    for recipe in RETRAIN_RECIPES.values():
        recipe.check()
    assert RETRAIN_RECIPES["voc"].scale_range[0] * 480 == pytest.approx(260)
    assert RETRAIN_RECIPES["voc"].scale_range[1] * 480 == pytest.approx(1040)


def test_encoder_from_a_cam_checkpoint_or_imagenet_weights(tmp_path):
    from weaktr_cli.checkpoints import save_checkpoint
    from weaktr_cli.models.cam_vit import WeakTrCAM
    from weaktr_cli.models.registry import build_vit, get_arch
    from weaktr_cli.retrain import build_model, load_encoder_weights

    torch.manual_seed(0)
    cam = WeakTrCAM("micro", 2)
    save_checkpoint(tmp_path / "cam.ckpt", cam.state_dict(), {"kind": "cam", "model": cam.config()})
    model = build_model(tiny_config(crop_size=48), 3)  # 6x6 grid: the 4x4 pos-embed resamples
    assert load_encoder_weights(model, tmp_path / "cam.ckpt") == "cam"
    enc = model.encoder.state_dict()
    for key, value in cam.state_dict().items():
        if key.startswith("backbone.blocks."):
            assert torch.equal(enc[key[len("backbone."):]], value)
    assert torch.allclose(enc["cls_token"], cam.cls_token.mean(dim=1, keepdim=True))
    assert enc["pos_embed"].shape == (1, 1 + 36, 64)
    assert torch.equal(enc["norm.weight"], torch.ones(64))  # never trained by the CAM model

    vit = build_vit(get_arch("micro"), num_classes=10)  # an ImageNet-style ViT with a head
    torch.save({"model": vit.state_dict()}, tmp_path / "imagenet.pth")
    assert load_encoder_weights(model, tmp_path / "imagenet.pth") == "imagenet"
    assert torch.equal(model.encoder.state_dict()["blocks.0.attn.qkv.weight"],
                       vit.state_dict()["blocks.0.attn.qkv.weight"])
    save_checkpoint(tmp_path / "seg.ckpt", {"x": torch.zeros(1)}, {"kind": "segmenter"})
    with pytest.raises(WeakTrError, match="retrained segmenter"):
        load_encoder_weights(model, tmp_path / "seg.ckpt")


def _crop_box_every_try(label, crop, rng, cat_max_ratio):
    """`_crop_box` as mmseg writes it: the class check on every try's window."""
    h, w = label.shape
    y = x = 0
    for _ in range(10):
        y = int(rng.integers(max(h - crop, 0) + 1))
        x = int(rng.integers(max(w - crop, 0) + 1))
        if cat_max_ratio >= 1.0:
            break
        window = label[y : y + crop, x : x + crop]
        counts = np.bincount(window[window != IGNORE_INDEX].ravel(), minlength=1)
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y, x


@pytest.mark.parametrize("size", [(32, 32), (24, 30), (40, 50)])
@pytest.mark.parametrize("fill", ["one class", "two classes"])
def test_crop_box_draws_and_picks_as_the_per_try_check(size, fill):
    from weaktr_cli.retrain.augment import _crop_box

    label = np.zeros(size, np.uint8)
    if fill == "two classes":
        label[: size[0] // 2] = 1
    for seed in range(5):
        fast, slow = np.random.default_rng(seed), np.random.default_rng(seed)
        assert _crop_box(label, 32, fast, 0.75) == _crop_box_every_try(label, 32, slow, 0.75)
        assert fast.integers(1 << 30) == slow.integers(1 << 30)  # the same draws were used
