"""Shared pieces behind DFKDE, DFM, FastFlow, DRAEM: PCA, KDE, flows, Perlin noise, synthesis, losses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import write_images

from adlib.models.components.flow import coupling_flow_2d, gaussian_nll
from adlib.models.components.focal_loss import focal_loss
from adlib.models.components.kde import GaussianKDE
from adlib.models.components.pca import PCA
from adlib.models.components.perlin import DRAEM_THRESHOLD, perlin_noise, random_perlin_mask, rotate_map
from adlib.models.components.ssim import ssim_loss, ssim_map
from adlib.models.components.sspcab import SSPCAB, sspcab_loss
from adlib.models.components.synthesis import AnomalySynthesizer, augment_texture, procedural_texture


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- PCA / KDE ------------------------------------------------------------------------------
def test_pca_matches_sklearn_count_and_fraction():
    from sklearn.decomposition import PCA as SkPCA

    rng = np.random.default_rng(0)
    data = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12)) + 3.0
    x = torch.tensor(data, dtype=torch.float32)
    for n in (5, 0.9):
        ours = PCA(n).fit(x)
        ref = SkPCA(n_components=n, svd_solver="full").fit(data)
        assert ours.num_components == ref.n_components_
        np.testing.assert_allclose(ours.explained_variance.numpy(), ref.explained_variance_, rtol=1e-4)
        # components agree up to sign
        dots = (ours.components.double().numpy() * ref.components_).sum(axis=1)
        np.testing.assert_allclose(np.abs(dots), 1.0, atol=1e-4)
        np.testing.assert_allclose(ours.reconstruct(x).numpy(), ref.inverse_transform(ref.transform(data)), atol=1e-3)


def test_pca_caps_components_at_data_rank_and_checks_dimension():
    x = torch.randn(4, 30)
    pca = PCA(16).fit(x)
    assert pca.num_components == 3  # 4 centred samples span 3 directions
    torch.testing.assert_close(pca.reconstruct(x), x, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="30-dim"):
        pca.transform(torch.randn(2, 31))
    with pytest.raises(RuntimeError, match="not fitted"):
        PCA(2).transform(x)


def test_gaussian_kde_matches_scipy():
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(1)
    data = rng.normal(size=(50, 3)) * np.array([1.0, 2.0, 0.5])
    query = rng.normal(size=(7, 3)) * 2
    ours = GaussianKDE(chunk_size=16).fit(torch.tensor(data)).log_density(torch.tensor(query))
    ref = gaussian_kde(data.T, bw_method="scott").logpdf(query.T)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)


# ----- flows ------------------------------------------------------------------------------------
def test_coupling_flow_is_invertible_on_any_size_and_alternates_kernels():
    torch.manual_seed(0)
    flow = coupling_flow_2d(6, 4, conv3x3_only=False, hidden_ratio=1.0)
    kernels = [blk.subnet[0].kernel_size[0] for blk in flow.module_list]
    assert kernels == [3, 1, 3, 1]
    only3 = coupling_flow_2d(6, 4, conv3x3_only=True)
    assert {blk.subnet[0].kernel_size[0] for blk in only3.module_list} == {3}
    for size in ((5, 7), (8, 8)):
        x = torch.randn(2, 6, *size)
        z, jac = flow(x)
        assert z.shape == x.shape and jac.shape == (2,)
        back, _ = flow(z, rev=True)
        torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(gaussian_nll(z, jac)).all()


# ----- Perlin noise -----------------------------------------------------------------------------
def test_perlin_noise_is_deterministic_in_unit_range_and_smooth():
    a = perlin_noise((64, 48), (4, 3), _gen(7))
    b = perlin_noise((64, 48), (4, 3), _gen(7))
    c = perlin_noise((64, 48), (4, 3), _gen(8))
    assert a.shape == (64, 48)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.std()) > 0.03  # not constant
    # smooth: neighbouring pixels differ far less than the overall spread
    assert float((a[1:] - a[:-1]).abs().mean()) < 0.2 * float(a.max() - a.min())


def test_random_perlin_mask_is_binary_and_deterministic():
    masks = [random_perlin_mask((32, 32), _gen(s)) for s in range(20)]
    again = [random_perlin_mask((32, 32), _gen(s)) for s in range(20)]
    assert all(torch.equal(m, n) for m, n in zip(masks, again))
    assert all(set(torch.unique(m).tolist()) <= {0.0, 1.0} for m in masks)
    covered = torch.stack(masks).mean()
    assert 0.0 < float(covered) < 0.5  # DRAEM's threshold keeps the regions sparse
    assert 0.5 < DRAEM_THRESHOLD < 1.0


def test_rotate_map_quarter_turn_of_a_square():
    x = torch.arange(16.0).view(4, 4)
    rotated = rotate_map(x, 90.0)
    assert torch.allclose(rotated, torch.rot90(x, 1, dims=(0, 1)), atol=1e-4) or \
        torch.allclose(rotated, torch.rot90(x, -1, dims=(0, 1)), atol=1e-4)


# ----- synthesis ----------------------------------------------------------------------------------
def test_auxiliary_images_decode_class_folders_and_stream_seeded_batches(tmp_path):
    from adlib.data import DataError
    from adlib.data.auxiliary import AuxiliaryImages, endless_batches

    written = write_images(tmp_path / "images" / "banded")
    (tmp_path / "images" / "banded" / "notes.txt").write_text("not an image")
    images = AuxiliaryImages(tmp_path / "images", 16)
    assert images.files == written
    first = next(endless_batches(images, 5, seed=1))
    assert first.shape == (5, 3, 16, 16) and 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, next(endless_batches(images, 5, seed=1)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        AuxiliaryImages(tmp_path / "empty", 16)


def test_procedural_textures_and_augmentations_stay_in_range():
    g = _gen(3)
    textures = [procedural_texture((24, 24), g) for _ in range(12)]
    for tex in textures:
        assert tex.shape == (3, 24, 24)
        assert 0.0 <= float(tex.min()) and float(tex.max()) <= 1.0
        aug = augment_texture(tex, g)
        assert aug.shape == tex.shape and 0.0 <= float(aug.min()) and float(aug.max()) <= 1.0
    assert len({round(float(t.std()), 4) for t in textures}) > 6  # varied, not one pattern


def test_synthesizer_blends_only_inside_mask_and_is_seeded():
    images = torch.rand(8, 3, 32, 32)
    out1, m1 = AnomalySynthesizer(seed=5)(images)
    out2, m2 = AnomalySynthesizer(seed=5)(images)
    assert torch.equal(out1, out2) and torch.equal(m1, m2)
    assert m1.shape == (8, 1, 32, 32)
    outside = (m1 == 0).expand_as(images)
    assert torch.equal(out1[outside], images[outside])
    assert float(m1.sum()) > 0  # some images got an anomaly
    assert 0.0 <= float(out1.min()) and float(out1.max()) <= 1.0
    never, masks = AnomalySynthesizer(seed=5, p_anomalous=0.0)(images)
    assert torch.equal(never, images) and float(masks.sum()) == 0.0
    flat = torch.full((8, 3, 32, 32), 0.25)  # given textures are blended where the mask is
    given, m3 = AnomalySynthesizer(seed=5)(images, flat)
    inside = (m3 > 0).expand_as(images)
    assert float(m3.sum()) > 0 and torch.equal(given[~inside], images[~inside])
    assert not torch.equal(given[inside], images[inside])


# ----- losses / SSPCAB ------------------------------------------------------------------------------
def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 32, 32), atol=1e-5)
    assert float(ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    small = ssim_loss(x, (x + 0.05 * torch.randn_like(x)).clamp(0, 1))
    large = ssim_loss(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1))
    assert 0 < float(small) < float(large)
    assert float(ssim_loss(x, x.flip(-1))) == pytest.approx(float(ssim_loss(x.flip(-1), x)), abs=1e-6)


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 8, 8) > 0.7).long()
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert float(focal_loss(logits, target, gamma=0.0)) == pytest.approx(float(ce), rel=1e-5)
    assert float(focal_loss(logits, target[:, None].float(), gamma=2.0)) < float(ce)


def test_sspcab_keeps_shape_and_never_sees_the_centre():
    torch.manual_seed(0)
    block = SSPCAB(4, kernel_size=1, dilation=1)
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    assert block(x).shape == x.shape
    block.masked_conv(x)[0, :, 4, 4].sum().backward()
    touched = (x.grad[0].abs().sum(0) > 0).nonzero().tolist()
    assert sorted(touched) == [[2, 2], [2, 6], [6, 2], [6, 6]]
    assert float(sspcab_loss(x.detach(), x.detach())) == 0.0
