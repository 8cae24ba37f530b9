"""Tiling (adlib.tiling): tile grids, exact stitching, tile datasets over the image cache, images
kept at their aspect ratio, saved tiled models, and the bad-input errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny import fit_on, normal_images

from adlib.artifacts import load_model, run_config, save_model, trained_record, write_record
from adlib.data import DataError, ImageCache, ImageDataset, load_sample
from adlib.data.images import KeepAspect
from adlib.data.manifest import make_manifest, manifest_row
from adlib.models.base import AnomalyModel, AnomalyOutput
from adlib.models.checks import check_config
from adlib.models.registry import build_model, resolve_config
from adlib.tiling import TiledModel, TileDataset, Tiling, axis_starts, check_images_fit, tiled


class Identity(AnomalyModel):
    """An "anomaly model" whose map is its input's first channel and whose score is the sum."""

    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        return AnomalyOutput(scores=images.sum(dim=(1, 2, 3)), maps=images[:, 0].clone())


@pytest.mark.parametrize("length,tile,stride", [(64, 16, 16), (70, 16, 16), (70, 16, 7), (16, 16, 4), (53, 20, 1)])
def test_tiles_cover_every_pixel_and_end_at_the_border(length, tile, stride):
    starts = axis_starts(length, tile, stride)
    covered = np.zeros(length, dtype=int)
    for start in starts:
        covered[start:start + tile] += 1
    assert starts[0] == 0 and starts[-1] == length - tile and (covered > 0).all()
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # never a gap, never more tiles than needed
    assert len(starts) == -(-(length - tile) // stride) + 1


@pytest.mark.parametrize("blend", ["mean", "max", "gaussian"])
@pytest.mark.parametrize("shape,tile,stride", [((64, 48), 16, 16), ((70, 53), 16, 16), ((70, 53), 16, 10),
                                               ((37, 90), 24, 5)])
def test_stitching_an_identity_model_reproduces_the_image_exactly(blend, shape, tile, stride):
    images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    model = TiledModel(Identity(), Tiling(tile, stride, blend), batch_size=5)
    out = model.predict(images)
    assert out.maps.dtype == torch.float32 and torch.equal(out.maps, images[:, 0])
    assert torch.equal(out.scores, images[:, 0].flatten(1).amax(dim=1))  # the score is the stitched map's maximum


def test_overlapping_tiles_blend_by_mean_max_or_gaussian_weights():
    class Constant(AnomalyModel):  # each tile's map is the tile's own mean: overlaps disagree
        def predict(self, images):
            value = images.mean(dim=(1, 2, 3))
            return AnomalyOutput(value, value[:, None, None].expand(-1, *images.shape[-2:]).clone())

    image = torch.zeros(1, 3, 16, 24)
    image[..., 16:] = 1.0  # the tiles at x = 0, 4, 8 are 0, 1/4 and 1/2 bright; all three cover x = 8..15
    maps = {blend: TiledModel(Constant(), Tiling(16, 4, blend)).predict(image).maps[0, 0]
            for blend in ("mean", "max", "gaussian")}
    assert maps["max"][8].item() == 0.5 and maps["mean"][8].item() == pytest.approx(0.25)
    assert maps["mean"][0].item() == 0.0 and maps["mean"][23].item() == 0.5  # covered by one tile
    # x = 8 is the edge of the x=8 tile and the centre of the x=0 tile: the Gaussian favours the latter
    assert 0 < maps["gaussian"][8].item() < 0.25 and maps["gaussian"][23].item() == 0.5


def _write(folder, name, pixels, mask=None):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}_mask.png")
    return str(folder / f"{name}.png"), str(folder / f"{name}_mask.png") if mask is not None else ""


@pytest.fixture()
def wide_images(tmp_path):
    """Two normal 40 x 72 images and one anomalous 50 x 30 image with a mask."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(40, 72), (40, 72)]):
        path, _ = _write(tmp_path / "good", f"{i}", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        rows.append(manifest_row("wide", "strip", "train", path, "", 0, "good"))
    mask = np.zeros((50, 30), dtype=bool)
    mask[2:6, 3:9] = True
    path, mask_path = _write(tmp_path / "bad", "0", rng.integers(0, 255, (50, 30, 3), dtype=np.uint8), mask)
    rows.append(manifest_row("wide", "strip", "train", path, mask_path, 1, "spot"))
    return make_manifest(rows)


@pytest.mark.parametrize("size,expected", [(None, [(40, 72), (40, 72), (50, 30)]),
                                           (36, [(20, 36), (20, 36), (36, 22)]),
                                           ([24, 48], [(24, 48), (24, 48), (24, 48)])])
def test_images_keep_their_aspect_ratio_cached_or_not(wide_images, tmp_path, size, expected):
    spec = KeepAspect.of(size)
    cache = ImageCache.build(wide_images, tmp_path / "cache", spec)
    assert cache.directories[0].parent.name == spec.label
    cached, plain = ImageDataset(wide_images, spec, cache=cache), ImageDataset(wide_images, spec)
    assert [cached.shape(i) for i in range(3)] == [plain.shape(i) for i in range(3)] == expected
    for i in range(3):
        assert tuple(cached[i]["image"].shape) == (3, *expected[i])
        assert torch.equal(cached[i]["image"], plain[i]["image"]) and torch.equal(cached[i]["mask"], plain[i]["mask"])
    assert cached[2]["mask"].sum() > 0
    assert ImageCache.build(wide_images, tmp_path / "cache", spec).built == 0  # reused
    if size is None:  # the images' own pixels, untouched
        assert np.array_equal(load_sample(wide_images["image_path"][0], "", spec)[0],
                              np.asarray(Image.open(wide_images["image_path"][0])))


def test_tile_dataset_cuts_cached_images_and_masks_alike(wide_images, tmp_path):
    spec = KeepAspect()
    images = ImageDataset(wide_images, spec, cache=ImageCache.build(wide_images, tmp_path / "cache", spec))
    tiles = TileDataset(images, Tiling(20, 16))
    per_image = [len(Tiling(20, 16).positions(*images.shape(i))) for i in range(3)]
    assert per_image == [3 * 5, 3 * 5, 3 * 2] and len(tiles) == sum(per_image)
    for k in (0, 7, len(tiles) - 1):
        row, y, x = tiles.tiles[k]
        item = tiles[k]
        assert item["index"] == row and item["image"].shape == (3, 20, 20)
        assert torch.equal(item["image"], images[row]["image"][:, y:y + 20, x:x + 20])
        assert torch.equal(item["mask"], images[row]["mask"][:, y:y + 20, x:x + 20])
    labels = {(row, y, x): tiles[k]["label"] for k, (row, y, x) in enumerate(tiles.tiles)}
    assert labels[(2, 0, 0)] == 1 and labels[(2, 30, 10)] == 0  # the defect is in the top-left tile only
    assert {labels[t] for t in labels if t[0] < 2} == {0}

    subset = TileDataset(images, Tiling(20, 16, per_image=3), seed=5)
    assert len(subset) == 9 and subset.tiles == TileDataset(images, Tiling(20, 16, per_image=3), seed=5).tiles
    assert set(subset.tiles) <= set(tiles.tiles)
    assert subset.tiles != TileDataset(images, Tiling(20, 16, per_image=3), seed=6).tiles


def test_tiled_model_trains_saves_and_reloads_with_identical_maps(tmp_path):
    config = resolve_config("autoencoder", channels=[4, 8], latent_channels=8, tile_size=32, tile_stride=24,
                            tile_blend="gaussian", batch_size=4)
    model = build_model(config, pretrained=False)
    full = normal_images(3, 80)[:, :, :, :56]  # 80 x 56 images, tiles at 0, 24, 48 (and 24 on the short side)
    tiles = TileDataset(_FixedImages(full), Tiling.of(config.train))
    fit_on(model, torch.stack([tiles[k]["image"] for k in range(len(tiles))]), batch_size=4, max_steps=3)
    wrapped = tiled(model, config.train)
    assert isinstance(wrapped, TiledModel)
    out = wrapped.predict(full)
    assert out.maps.shape == (3, 80, 56) and torch.isfinite(out.maps).all()
    save_model(tmp_path, wrapped, run_config(config, dataset="d", category="c", seed=0, pretrained=False))
    write_record(tmp_path)
    assert trained_record(tmp_path)["weights_sha256"]
    reloaded, saved = load_model(tmp_path)
    assert isinstance(reloaded, TiledModel) and saved["train"]["tile_size"] == 32
    again = reloaded.predict(full)
    assert torch.equal(again.maps, out.maps) and torch.equal(again.scores, out.scores)


class _FixedImages:
    """The few methods of an ImageDataset TileDataset uses, over in-memory images."""

    def __init__(self, images: torch.Tensor) -> None:
        self.pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        self.manifest = pd.DataFrame({"image_path": [f"image{i}" for i in range(len(images))], "label": 0})

    def __len__(self):
        return len(self.pixels)

    def shape(self, row):
        return self.pixels.shape[1:3]

    def raw(self, row):
        return self.pixels[row], np.zeros(self.pixels.shape[1:3], dtype=np.uint8)

    def item(self, row, pixels, mask, label=None):
        return {"image": torch.from_numpy(pixels.transpose(2, 0, 1) / 255.0).float(), "label": label or 0}


@pytest.mark.parametrize("overrides,key,words", [
    ({"tile_size": 32, "tile_stride": 0}, "tile_stride", "0 is out of range: use 1 to tile_size=32"),
    ({"tile_size": 32, "tile_stride": 40}, "tile_stride", "gaps of 8 px"),
    ({"tile_size": 8}, "tile_size", "from 16 to 8192"),
    ({"tile_size": 32, "tile_image_size": 24}, "tile_image_size", "smaller than tile_size=32"),
    ({"tile_size": 32, "tile_image_size": [64]}, "tile_image_size", "[height, width]"),
    ({"tile_size": 32, "tiles_per_image": 0}, "tiles_per_image", "positive number"),
    ({"tile_size": 32, "center_crop": 48}, "center_crop", "set center_crop to null"),
    ({"tile_stride": 16}, "tile_stride", "no effect without tile_size"),
    ({"tile_size": 32, "tile_blend": "median"}, "tile_blend", "one of 'mean', 'max', 'gaussian'"),
])
def test_bad_tiling_values_are_named_before_any_job(overrides, key, words):
    problems = check_config("padim", {"backbone": "resnet18", **overrides})
    assert [p.key for p in problems] == [key] and words in problems[0].message, problems
    if key != "tile_blend":  # (a type error the check reports; the run would refuse it too)
        with pytest.raises(ValueError, match="bad tiling"):
            Tiling.of(resolve_config("padim", **overrides).train)


def test_a_model_without_maps_cannot_be_tiled():
    [problem] = check_config("dfkde", {"backbone": "resnet18", "tile_size": 64})
    assert problem.key == "tile_size" and "no anomaly maps" in problem.message
    with pytest.raises(ValueError, match="cannot be tiled"):
        tiled(build_model(resolve_config("dfkde", backbone="resnet18"), pretrained=False), {"tile_size": 64,
                                                                                            "batch_size": 2})
    assert check_config("padim", {"backbone": "resnet18", "tile_size": 64, "tile_stride": 32}) == []
    problems = check_config("autoencoder", {"tile_size": 60})  # the model's own size rule, at the tile size
    assert problems and "multiples of" in problems[0].message


def test_a_tile_larger_than_an_image_is_refused_naming_it(wide_images):
    with pytest.raises(DataError, match=r"1 image\(s\).*50x30 px.*at most 30"):
        check_images_fit(wide_images["image_path"], {"tile_size": 32, "batch_size": 2})
    check_images_fit(wide_images["image_path"], {"tile_size": 30, "batch_size": 2})
    check_images_fit(wide_images["image_path"], {"img_size": 256, "batch_size": 2})  # untiled: nothing to check
    with pytest.raises(ValueError, match="40x30 px, smaller than tile_size=32"):
        TiledModel(Identity(), Tiling(32, 32)).predict(torch.zeros(1, 3, 40, 30))


def test_images_of_different_sizes_are_scored_whole_at_full_resolution(tmp_path):
    from adlib.run.loaders import image_loader
    from adlib.run.scoring import STORED_MAP_SIZE, score_images
    from adlib.settings import Settings

    rng = np.random.default_rng(1)
    normal = rng.integers(0, 200, (40, 72, 3), dtype=np.uint8)
    defect = rng.integers(0, 200, (50, 30, 3), dtype=np.uint8)
    mask = np.zeros((50, 30), dtype=bool)
    mask[20:26, 4:13] = True
    defect[mask, 0] = 255  # the identity "model" maps the red channel: only the defect is at its maximum
    rows = [manifest_row("wide", "strip", "test", *_write(tmp_path / "good", "0", normal), 0, "good"),
            manifest_row("wide", "strip", "test", *_write(tmp_path / "bad", "0", defect, mask), 1, "spot")]
    loader = image_loader(make_manifest(rows), {"img_size": 64, "batch_size": 4, "tile_size": 16, "tile_stride": 12},
                          tmp_path / "cache", Settings(output_dir=tmp_path), shuffle=False)
    assert loader.batch_size == 1 and loader.dataset[1]["image"].shape == (3, 50, 30)
    scored = score_images(TiledModel(Identity(), Tiling(16, 12)), loader, torch.device("cpu"), with_pixels=True,
                          progress=False)
    pixels = scored.pixel_metrics  # masks and maps meet at each image's own size
    assert pixels["pixel_auroc"] == pytest.approx(1.0) and pixels["pixel_aupro"] == pytest.approx(1.0)
    assert scored.scores[1] == 1.0 and scored.scores[0] < 200 / 255 + 1e-6
    assert scored.maps.shape == (2, STORED_MAP_SIZE, STORED_MAP_SIZE)  # two sizes: stored as stretched squares
