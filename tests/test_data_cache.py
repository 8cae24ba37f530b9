"""The decoded-image cache: built once, reused, invalidated, identical to decoding, race-safe."""
from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adlib.data import DataError, ImageCache, ImageDataset, index_dataset
from adlib.data.synthetic import make_dataset


@pytest.fixture()
def manifest(tmp_path):
    root = make_dataset("mvtec", tmp_path / "data", categories=("widget", "gadget"), n_train=4,
                        n_test_good=2, n_test_bad=4, size=40)
    return index_dataset("mvtec", root, "all")


def _shards(cache_root: Path) -> list[Path]:
    return sorted(p for p in cache_root.glob("*/*/*/*") if p.is_dir())


def test_built_once_then_reused(manifest, tmp_path):
    cache = ImageCache.build(manifest, tmp_path / "cache", img_size=32)
    assert cache.built == 2 and len(cache) == len(manifest)
    assert [d.relative_to(tmp_path / "cache").parts[:3] for d in cache.directories] == \
        [("mvtec", "gadget", "32px"), ("mvtec", "widget", "32px")]
    images = np.load(cache.directories[0] / "images.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3)
    again = ImageCache.build(manifest, tmp_path / "cache", img_size=32)
    assert again.built == 0 and again.directories == cache.directories
    assert _shards(tmp_path / "cache") == cache.directories


def test_cached_items_equal_decoded_items(manifest, tmp_path):
    for crop in (None, 24):
        plain = ImageDataset(manifest, img_size=32, center_crop=crop)
        cached = ImageDataset(manifest, img_size=32, center_crop=crop, cache=tmp_path / "cache")
        for i in (0, len(manifest) - 1):
            assert torch.equal(plain[i]["image"], cached[i]["image"])
            assert torch.equal(plain[i]["mask"], cached[i]["mask"])
            assert plain[i]["path"] == cached[i]["path"]
        assert cached[len(manifest) - 1]["mask"].sum() > 0
    loader = torch.utils.data.DataLoader(cached, batch_size=5, num_workers=1)  # workers reopen the maps
    assert sum(len(batch["label"]) for batch in loader) == len(manifest)


def test_cache_reads_do_not_map_the_images_into_the_process(manifest, tmp_path):
    cached = ImageDataset(manifest, img_size=32, cache=tmp_path / "cache")
    assert all(torch.is_tensor(cached[i]["image"]) for i in range(len(manifest)))
    maps = Path("/proc/self/maps")
    if maps.exists():  # a memory map would keep every image read resident in this process
        assert "images.npy" not in maps.read_text()
    rows = cached.cache.shards[0].arrays()[0]
    with pytest.raises(IndexError, match="outside"):
        rows[len(rows)]


def test_invalidated_when_sources_or_size_change(manifest, tmp_path):
    first = ImageCache.build(manifest, tmp_path / "cache", img_size=32)
    source = Path(manifest["image_path"].iloc[0])
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "edited"
    second = ImageCache.build(manifest, tmp_path / "cache", img_size=32)
    assert second.built == 1
    changed = [d for d in second.directories if d not in first.directories]
    assert len(changed) == 1 and not any(d.exists() for d in first.directories if d not in second.directories)
    train = ImageCache.build(manifest[manifest.split == "train"], tmp_path / "cache", img_size=32)
    assert train.built == 0  # a subset is served by the category's shard
    extra = Path(manifest["image_path"].iloc[1]).with_name("new.png")
    shutil.copy(manifest["image_path"].iloc[1], extra)
    more = pd.concat([manifest, manifest.iloc[[1]].assign(image_path=str(extra))], ignore_index=True)
    assert ImageCache.build(more, tmp_path / "cache", img_size=32).built == 1  # a file added
    bigger = ImageCache.build(manifest, tmp_path / "cache", img_size=36)
    assert bigger.built == 2 and bigger.size == 36
    assert len(_shards(tmp_path / "cache")) == 4  # 32 px and 36 px shards live side by side
    with pytest.raises(ValueError, match="img_size=36"):
        ImageDataset(manifest, img_size=32, cache=bigger)


def _build_in_child(args):
    manifest, cache_root = args
    cache = ImageCache.build(manifest, cache_root, img_size=32)
    return cache.built, [str(d) for d in cache.directories]


def test_two_processes_racing_build_once(manifest, tmp_path):
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.map(_build_in_child, [(manifest, tmp_path / "cache")] * 2)
    assert sum(built for built, _ in results) == 2  # two shards, each built by one process
    assert results[0][1] == results[1][1]
    cache = ImageCache.build(manifest, tmp_path / "cache", img_size=32)
    assert cache.built == 0 and _shards(tmp_path / "cache") == cache.directories
    assert not list((tmp_path / "cache").rglob(".build-*"))


def test_corrupt_image_fails_the_build_with_its_name(manifest, tmp_path):
    broken = Path(manifest["image_path"].iloc[3])
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataError, match=f"cannot decode image {broken}.*corrupt or truncated"):
        ImageCache.build(manifest, tmp_path / "cache", img_size=32)
    assert manifest["category"].iloc[3] == "gadget"
    assert not list((tmp_path / "cache" / "mvtec" / "gadget").rglob("key.json"))  # no half-built shard
    assert not list((tmp_path / "cache").rglob(".build-*"))

def test_image_missing_from_manifest_cache(manifest, tmp_path):
    cache = ImageCache.build(manifest.iloc[:3], tmp_path / "cache", img_size=32)
    with pytest.raises(DataError, match="not in the image cache"):
        ImageDataset(manifest, img_size=32, cache=cache)[len(manifest) - 1]


# ---------------------------------------------------------------------------------------------- damage
def _one_shard(manifest, tmp_path):
    widget = manifest[manifest.category == "widget"]
    cache = ImageCache.build(widget, tmp_path / "cache", img_size=32)
    return widget, cache.directories[0]


def test_a_truncated_shard_is_rebuilt_with_a_warning(manifest, tmp_path):
    from adlib.data import DataWarning

    widget, shard = _one_shard(manifest, tmp_path)
    images = shard / "images.npy"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    with pytest.warns(DataWarning, match="damaged"):
        cache = ImageCache.build(widget, tmp_path / "cache", img_size=32)
    assert cache.built == 1
    fresh = ImageDataset(widget, 32)
    np.testing.assert_array_equal(cache.get(fresh._paths[0])[0], (fresh[0]["image"].numpy() * 255).round()
                                  .astype(np.uint8).transpose(1, 2, 0))


def test_zeroed_pixels_in_a_shard_are_detected_and_rebuilt(manifest, tmp_path):
    from adlib.data import DataWarning
    from adlib.data import cache as cache_module

    widget, shard = _one_shard(manifest, tmp_path)
    data = np.load(shard / "images.npy", mmap_mode="r+")
    data[1] = 0  # same size, silently wrong pixels
    data.flush()
    del data
    cache_module._VERIFIED.clear()  # as in a new process
    with pytest.warns(DataWarning, match="changed since it was written"):
        cache = ImageCache.build(widget, tmp_path / "cache", img_size=32)
    assert cache.built == 1 and cache.get(cache.shards[0].paths[1])[0].max() > 0


def test_a_full_disk_while_caching_is_a_clear_error(manifest, tmp_path):
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(DataError, match=r"not enough disk space for the image cache in .*disk.* MiB"):
            ImageCache.build(manifest, disk / "cache", img_size=64)
        assert not [p for p in disk.rglob("*") if p.is_file() and p.name != ".lock"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_bad_sizes_are_refused_before_any_folder_is_made(manifest, tmp_path):
    with pytest.raises(DataError, match="img_size=-5"):
        ImageCache.build(manifest, tmp_path / "cache", img_size=-5)
    assert not (tmp_path / "cache").exists()
