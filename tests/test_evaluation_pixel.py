"""Pixel AUROC / AUPRO: hand-worked cases, exact references, streaming and edge cases."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from adlib.evaluation import PixelMetrics, aupro, aupro_exact, pixel_auroc


def _hand_case():
    """Two 2x4 images. Image A: region r1 = two pixels (0.9, 0.8), region r2 = one pixel (0.35),
    normals 0.1 0.3 0.2 0.1 0.6. Image B: empty mask, normals 0.4 and seven 0.05 (13 normals).

    PRO-vs-FPR curve: (0,0) -> (0,.25) [t=.9] -> (0,.5) [t=.8] -> (1/13,.5) [t=.6]
    -> (2/13,.5) [t=.4] -> (2/13,1) [t=.35] -> flat at 1.
    Area up to 0.3 = .5 * 2/13 + 1 * (.3 - 2/13) = .3 - 1/13, so AUPRO = 1 - 1/(13*.3).
    Up to FPR 1 the area is .5 * 2/13 + 11/13 = 12/13.
    """
    maps = np.array([
        [[0.9, 0.8, 0.1, 0.3], [0.2, 0.1, 0.6, 0.35]],
        [[0.05, 0.4, 0.05, 0.05], [0.05, 0.05, 0.05, 0.05]],
    ])
    masks = np.array([
        [[1, 1, 0, 0], [0, 0, 0, 1]],
        [[0, 0, 0, 0], [0, 0, 0, 0]],
    ], dtype=bool)
    return maps, masks


def test_aupro_hand_worked():
    maps, masks = _hand_case()
    expected = 1 - 1 / (13 * 0.3)
    assert aupro_exact(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-12)  # distinct scores -> distinct bins
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(12 / 13, abs=1e-12)
    assert aupro_exact(maps, masks, fpr_limit=1.0) == pytest.approx(12 / 13, abs=1e-12)


def test_aupro_interpolates_tied_segment():
    # one region pixel tied with one of two normal pixels: segment (0,0) -> (0.5,1);
    # at FPR 0.3 the PRO is 0.6, area 0.3*0.6/2 = 0.09, normalised 0.3
    maps = np.array([[[0.5, 0.5, 0.1]]])
    masks = np.array([[[1, 0, 0]]], dtype=bool)
    assert aupro_exact(maps, masks) == pytest.approx(0.3, abs=1e-12)
    assert aupro(maps, masks) == pytest.approx(0.3, abs=1e-12)


def test_regions_use_8_connectivity():
    # diagonal neighbours are one region (as in the MVTec AD evaluation); a gap makes two
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    masks[1, 0, 0] = masks[1, 2, 2] = True
    pm = PixelMetrics()
    pm.update(np.zeros(masks.shape), masks)
    assert pm.n_regions == 3 and pm.n_images_with_anomalies == 2


def test_perfect_maps_give_one_and_never_exceed_one():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), dtype=bool)
    masks[:3, 5:15, 5:12] = True
    masks[1, 20:30, 25:30] = True
    maps = masks.astype(np.float32) + rng.uniform(0, 0.01, masks.shape).astype(np.float32)
    assert aupro(maps, masks) == pytest.approx(1.0)
    assert aupro(maps, masks) <= 1.0
    assert aupro_exact(maps, masks) <= 1.0
    assert pixel_auroc(maps, masks) == pytest.approx(1.0)


def _random_case(seed, n=12, size=48):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 2):  # every other image has defects, the rest are normal
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 10, 2)
            h, w = rng.integers(2, 10, 2)
            masks[i, r:r + h, c:c + w] = True
    maps = rng.gamma(2.0, 1.0, masks.shape) + 1.5 * masks * rng.random(masks.shape)
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed", range(3))
def test_binned_close_to_exact(seed):
    maps, masks = _random_case(seed)
    exact_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(exact_auroc, abs=2e-4)
    assert aupro(maps, masks) == pytest.approx(aupro_exact(maps, masks), abs=2e-3)
    # coarse grids are less accurate but still close
    assert pixel_auroc(maps, masks, num_bins=64) == pytest.approx(exact_auroc, abs=2e-2)


def test_streaming_with_growing_range_stays_accurate():
    maps, masks = _random_case(5, n=10)
    maps[6:] = maps[6:] * 4 - 3  # later batches reach far beyond the first batch's range
    pm = PixelMetrics(num_bins=2048)
    for start in range(0, 10, 2):
        pm.update(maps[start:start + 2], masks[start:start + 2])
    lo, width = pm.grid
    assert lo <= maps.min() and lo + pm.num_bins * width >= maps.max()
    result = pm.compute()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=2e-3)
    assert result["pixel_aupro"] == pytest.approx(aupro_exact(maps, masks), abs=1e-2)
    assert result["notes"] == []


def test_streaming_equals_one_shot_on_the_same_grid():
    maps, masks = _random_case(7, n=8)
    score_range = (float(maps.min()), float(maps.max()))
    whole = PixelMetrics(score_range=score_range)
    whole.update(maps, masks)
    parts = PixelMetrics(score_range=score_range)
    for i in range(8):
        parts.update(maps[i], masks[i])  # single [H,W] images are accepted
    assert parts.compute() == whole.compute()


def test_empty_masks_never_crash():
    maps, masks = _random_case(1, n=4)
    masks[1:] = False  # three images without defects contribute only normal pixels
    pm = PixelMetrics()
    for i in range(4):
        pm.update(maps[i:i + 1], masks[i:i + 1])
    out = pm.compute()
    assert 0.0 <= out["pixel_aupro"] <= 1.0 and 0.0 <= out["pixel_auroc"] <= 1.0


def test_no_anomalous_pixels_gives_none_with_reason():
    maps = np.random.default_rng(0).random((3, 16, 16))
    pm = PixelMetrics()
    pm.update(maps, np.zeros_like(maps, dtype=bool))
    out = pm.compute()
    assert out["pixel_auroc"] is None and out["pixel_aupro"] is None
    assert any(note.startswith("pixel_aupro: no anomalous pixels") for note in out["notes"])
    assert PixelMetrics().compute()["pixel_auroc"] is None  # nothing given at all
    assert aupro_exact(maps, np.zeros_like(maps, dtype=bool)) is None


def test_constant_maps_and_torch_inputs():
    torch = pytest.importorskip("torch")
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, 2:4, 2:4] = True
    maps = torch.full((2, 1, 8, 8), 0.25, dtype=torch.float16)
    pm = PixelMetrics()
    pm.update(maps, masks)
    assert pm.compute()["pixel_auroc"] == pytest.approx(0.5)  # all tied
    pm.update(torch.rand(2, 8, 8), masks[:, 0])  # grows from a zero-width grid
    assert 0.0 <= pm.compute()["pixel_auroc"] <= 1.0


@pytest.mark.parametrize("maps,masks,message", [
    (np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), "differ in shape"),
    (np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)), "NaN/infinite"),
    (np.zeros((1, 2, 3, 4, 5)), np.zeros((1, 2, 3, 4, 5)), r"\[B,H,W\]"),
])
def test_bad_maps_raise_clear_error(maps, masks, message):
    with pytest.raises(ValueError, match=message):
        PixelMetrics().update(maps, masks)
