"""PaDiM and PatchCore through the model contract, plus their shared components."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage
from tiny import fit_on

from adlib.models import create_model, resolve_config
from adlib.models.components.features import (concat_feature_maps, local_patch_average, position_major_embedding,
                                              reduce_channels)
from adlib.models.components.gaussian import PositionGaussianAccumulator, mahalanobis
from adlib.models.components.maps import gaussian_blur2d, upsample_map
from adlib.models.patchcore import reweighted_scores

BACKBONE = "resnet10t"  # small timm ResNet: random init, fast on CPU
SIZE = 64


def texture(n: int, seed: int, blob: bool = False, size: int = SIZE) -> torch.Tensor:
    """A fixed periodic texture with mild noise; ``blob`` pastes a bright spot somewhere."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    base = 0.5 + 0.2 * torch.sin(xx / 2.0) * torch.cos(yy / 3.0)
    images = base.expand(n, 3, size, size) + 0.02 * torch.randn(n, 3, size, size, generator=gen)
    if blob:
        for i in range(n):
            cy, cx = torch.randint(12, size - 12, (2,), generator=gen).tolist()
            images[i] += 0.6 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0 ** 2))
    return images.clamp(0, 1)


TRAIN, NORMAL, DEFECT = texture(10, seed=1), texture(3, seed=2), texture(3, seed=3, blob=True)


def fit_one_pass(name: str, **overrides):
    model = create_model(name, backbone=BACKBONE, pretrained=False, **overrides)
    fit_on(model, TRAIN, batch_size=4)
    return model


@pytest.fixture(scope="module")
def padim():
    return fit_one_pass("padim")


@pytest.fixture(scope="module")
def patchcore():
    return fit_one_pass("patchcore")


# ----- shared components -------------------------------------------------------------------
def test_gaussian_blur_matches_scipy():
    maps = torch.rand(2, 40, 48, dtype=torch.float64)
    got = gaussian_blur2d(maps, sigma=4.0)
    for i in range(2):
        want = ndimage.gaussian_filter(maps[i].numpy(), sigma=4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-10, atol=1e-12)
    assert gaussian_blur2d(torch.rand(1, 8, 8), 4.0).shape == (1, 8, 8)  # smaller than the kernel


def test_feature_concat_local_average_and_channel_pooling():
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 5, 4, 4)
    emb = concat_feature_maps([b, a], mode="nearest")  # the larger grid wins whatever the order
    assert emb.shape == (2, 8, 8, 8)
    assert torch.equal(emb[:, :5, ::2, ::2], b) and torch.equal(emb[:, 5:], a)
    for channels in ([0, 2, 5, 7], [5, 6], [1]):  # picked before resizing = picked after
        index = torch.tensor(channels)
        want = concat_feature_maps([b, a], mode="nearest").index_select(1, index).flatten(2).permute(2, 0, 1)
        assert torch.equal(position_major_embedding([b, a], channels=index), want)
    odd = torch.rand(2, 4, 3, 5)  # 8x8 is not a whole multiple of 3x5: interpolation fallback
    want = concat_feature_maps([a, odd], mode="nearest").flatten(2).permute(2, 0, 1)
    assert torch.equal(position_major_embedding([a, odd]), want)
    avg = local_patch_average(a, 3)
    assert avg.shape == a.shape
    torch.testing.assert_close(avg[:, :, 3, 4], a[:, :, 2:5, 3:6].mean(dim=(2, 3)))
    pooled = reduce_channels(torch.arange(8.0).view(1, 8, 1, 1), 4)
    assert pooled.flatten().tolist() == [0.5, 2.5, 4.5, 6.5]
    assert upsample_map(torch.ones(2, 4, 4), (16, 12)).shape == (2, 16, 12)


def test_streamed_gaussians_and_mahalanobis_match_numpy():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(13, 3, 4, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 10.0
    acc = PositionGaussianAccumulator()
    for batch in feats.split(5):
        acc.add(batch.transpose(0, 1))  # position-major [P, B, D]
    eps = 0.01
    inv = acc.inverse_covariance(eps)
    test = torch.randn(2, 3, 4, generator=gen) + 10.0
    got = mahalanobis(test.transpose(0, 1), acc.mean(), inv)
    x = feats.double().numpy()
    for p in range(3):
        mean = x[:, p].mean(0)
        cov = np.cov(x[:, p], rowvar=False) + eps * np.eye(4)
        np.testing.assert_allclose(acc.mean()[p].numpy(), mean, rtol=1e-5)
        np.testing.assert_allclose(acc.covariance(eps)[p].numpy(), cov, rtol=1e-5, atol=1e-6)
        for b in range(2):
            delta = test[b, p].double().numpy() - mean
            want = math.sqrt(delta @ np.linalg.inv(cov) @ delta)
            assert got[b, p].item() == pytest.approx(want, rel=1e-4)


def test_frozen_extractor_runs_large_batches_in_chunks_with_the_same_maps():
    from adlib.backbones import FeatureExtractor
    from adlib.backbones.extractor import DEPTHWISE_CHUNK, FROZEN_CHUNK

    extractor = FeatureExtractor(BACKBONE, ["layer1", "layer2"], pretrained=False)
    depthwise = FeatureExtractor("mobilenetv2_050", ["layer1"], pretrained=False)
    assert (extractor.chunk, depthwise.chunk) == (FROZEN_CHUNK, DEPTHWISE_CHUNK) and DEPTHWISE_CHUNK < FROZEN_CHUNK
    images = torch.rand(FROZEN_CHUNK + 3, 3, 32, 32)
    chunked = extractor(images)
    with torch.no_grad():
        whole = extractor.model(images.contiguous(memory_format=torch.channels_last))
    assert [m.shape[0] for m in chunked] == [FROZEN_CHUNK + 3] * 2
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_trainable_extractor_chunks_only_when_it_evaluates_without_gradients():
    from adlib.backbones import FeatureExtractor
    from adlib.backbones.extractor import FROZEN_CHUNK

    student = FeatureExtractor(BACKBONE, ["layer1", "layer2"], pretrained=False, frozen=False).eval()
    images = torch.rand(FROZEN_CHUNK + 3, 3, 32, 32)
    calls = []
    student.model.register_forward_pre_hook(lambda _module, args: calls.append(args[0].shape[0]))
    with torch.no_grad():
        chunked = student(images)
        whole = student.model(images)
    assert calls == [FROZEN_CHUNK, 3, FROZEN_CHUNK + 3]
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    calls.clear()
    student.train()(images)[0].sum().backward()  # training: one batch (batch-norm statistics of all images)
    assert calls == [FROZEN_CHUNK + 3]


def test_inverse_covariance_in_position_blocks_equals_all_at_once():
    gen = torch.Generator().manual_seed(1)
    acc = PositionGaussianAccumulator()
    for _ in range(3):
        acc.add(torch.randn(10, 6, 5, generator=gen) * 2.0 + 3.0)
    whole = acc.inverse_covariance(0.01, block=10)
    for block in (1, 3):  # blocks that do and do not divide the 10 positions
        assert torch.equal(acc.inverse_covariance(0.01, block=block), whole)
    assert whole.dtype == torch.float32 and whole.shape == (10, 5, 5)


def test_accumulator_rejects_changing_image_size():
    acc = PositionGaussianAccumulator()
    acc.add(torch.rand(4, 2, 3))
    with pytest.raises(ValueError, match="same size"):
        acc.add(torch.rand(9, 2, 3))


# ----- PaDiM --------------------------------------------------------------------------------
def test_padim_defaults_follow_the_paper():
    cfg = resolve_config("padim")
    assert cfg.model["backbone"] == "resnet18" and cfg.model["layers"] == ["layer1", "layer2", "layer3"]
    assert cfg.model["n_features"] == 100 and cfg.train["num_epochs"] == 1 and cfg.train["batch_size"] == 32


def test_padim_predicts_maps_at_input_size(padim):
    out = padim.predict(NORMAL)
    assert out.scores.shape == (3,) and out.maps.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(out.scores, out.maps.flatten(1).amax(1))
    assert padim.feature_index.numel() == 100
    assert padim.gaussian_mean.shape == (16 * 16, 100)  # layer1 grid of a 64 px image


def test_padim_distance_map_matches_numpy(padim):
    with torch.no_grad():
        train = padim.embed(TRAIN)[0].transpose(0, 1).double().numpy()  # [N, P, D]
        test = padim.embed(NORMAL[:1])[0].transpose(0, 1).double().numpy()
        got = padim.distance_map(NORMAL[:1]).flatten()
    for p in (0, 37, 255):
        mean = train[:, p].mean(0)
        cov = np.cov(train[:, p], rowvar=False) + padim.covariance_eps * np.eye(train.shape[2])
        delta = test[0, p] - mean
        assert got[p].item() == pytest.approx(math.sqrt(delta @ np.linalg.solve(cov, delta)), rel=2e-3)


def test_padim_scores_a_pasted_defect_higher(padim):
    assert padim.predict(DEFECT).scores.min() > padim.predict(NORMAL).scores.max()


def test_padim_save_load_gives_identical_predictions(padim, tmp_path):
    state = padim.saved_state()
    assert not any(k.startswith("feature_extractor.") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    fresh = create_model("padim", backbone=BACKBONE, pretrained=False).eval()
    fresh.load_saved_state(load_file(tmp_path / "model.safetensors"))
    a, b = padim.predict(DEFECT), fresh.predict(DEFECT)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_padim_channel_subset_follows_the_run_seed():
    from adlib.models.base import FitContext

    model = create_model("padim", backbone=BACKBONE, pretrained=False)
    first = model.feature_index.clone()
    model.setup_fit(FitContext(device=torch.device("cpu"), seed=7))
    assert not torch.equal(first, model.feature_index)
    assert model.feature_index.unique().numel() == 100 and model.feature_index.max() < 64 + 128 + 256


def test_padim_refuses_to_predict_unfitted_or_at_another_size(padim):
    with pytest.raises(RuntimeError, match="not fitted"):
        create_model("padim", backbone=BACKBONE, pretrained=False).predict(NORMAL)
    with pytest.raises(ValueError, match="training image size"):
        padim.predict(texture(1, seed=0, size=32))


# ----- PatchCore ----------------------------------------------------------------------------
def test_patchcore_defaults_follow_the_paper():
    cfg = resolve_config("patchcore")
    assert cfg.model["backbone"] == "wide_resnet50_2" and cfg.model["layers"] == ["layer2", "layer3"]
    assert cfg.model["coreset_sampling_ratio"] == 0.1 and cfg.model["num_neighbors"] == 9


def test_patchcore_memory_bank_is_the_coreset(patchcore):
    patches = 10 * 8 * 8  # layer2 grid of a 64 px image
    assert patchcore.memory_bank.shape == (int(patches * 0.1), 128 + 256)
    assert patchcore.memory_bank.dtype == torch.float32


def test_patchcore_predicts_maps_at_input_size(patchcore):
    out = patchcore.predict(NORMAL)
    assert out.scores.shape == (3,) and out.maps.shape == (3, SIZE, SIZE)
    assert torch.isfinite(out.maps).all() and (out.scores > 0).all()


def test_patchcore_scores_a_pasted_defect_higher(patchcore):
    assert patchcore.predict(DEFECT).scores.min() > patchcore.predict(NORMAL).scores.max()


def test_patchcore_save_load_gives_identical_predictions(patchcore, tmp_path):
    state = patchcore.saved_state()
    assert set(state) == {"memory_bank"}
    save_file(state, tmp_path / "model.safetensors")
    fresh = create_model("patchcore", backbone=BACKBONE, pretrained=False).eval()
    fresh.load_saved_state(load_file(tmp_path / "model.safetensors"))
    a, b = patchcore.predict(DEFECT), fresh.predict(DEFECT)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_patchcore_reweighting_on_a_hand_case():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    feats = torch.tensor([[[0.1, 0.0], [-2.0, 0.0]],     # image 0: worst patch near a dense cluster
                          [[0.0, 0.2], [10.0, 12.0]]])   # image 1: worst patch near the isolated item
    scores = torch.tensor([[0.1, 2.0], [0.2, 2.0]])
    nn_index = torch.tensor([[0, 0], [2, 3]])
    got = reweighted_scores(scores, nn_index, feats, bank, num_neighbors=3)
    # N_3(m0) = {m0, m1, m2}: distances from (-2, 0) are 2, 3, sqrt(5)
    w0 = 1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(math.sqrt(5)))
    # N_3(m3) = {m3, m1, m2}: distances from (10, 12) are 2, 15, sqrt(221)
    w1 = 1 - math.exp(2) / (math.exp(2) + math.exp(15) + math.exp(math.sqrt(221)))
    torch.testing.assert_close(got, torch.tensor([2 * w0, 2 * w1]))
    assert torch.equal(reweighted_scores(scores, nn_index, feats, bank, num_neighbors=1), torch.tensor([2.0, 2.0]))


def test_patchcore_capped_collection_and_float32_storage():
    model = fit_one_pass("patchcore", max_train_patches=200, feature_dtype="float32", coreset_sampling_ratio=0.5)
    assert model.memory_bank.shape[0] == 100  # half of the 200 reservoir-sampled patches
    assert model.predict(NORMAL).maps.shape == (3, SIZE, SIZE)


def test_patchcore_on_efficientnet_lite_uses_its_input_stats():
    model = create_model("patchcore", backbone="tf_efficientnet_lite0", pretrained=False, embedding_dim=64)
    assert model._input_mean.flatten().tolist() == [0.5, 0.5, 0.5]
    fit_on(model, TRAIN[:2])
    assert model.memory_bank.shape[1] == 64
    assert model.predict(NORMAL[:1]).maps.shape == (1, SIZE, SIZE)


def test_patchcore_rejects_bad_options():
    with pytest.raises(ValueError, match="coreset_sampling_ratio"):
        create_model("patchcore", backbone=BACKBONE, pretrained=False, coreset_sampling_ratio=0.0)
    with pytest.raises(ValueError, match="feature_dtype"):
        create_model("patchcore", backbone=BACKBONE, pretrained=False, feature_dtype="int8")
    with pytest.raises(RuntimeError, match="not fitted"):
        create_model("patchcore", backbone=BACKBONE, pretrained=False).predict(NORMAL)


def test_stages_after_the_deepest_requested_layer_are_not_built_or_run():
    """timm's EfficientNet feature networks run every stage whatever ``out_indices`` asks for:
    Lite0's two stages after ``layer3`` kept 330 MiB of STFPM's student's activations per step."""
    from adlib.backbones import FeatureExtractor, create_backbone

    layers = ["layer1", "layer3"]
    student = FeatureExtractor("tf_efficientnet_lite0", layers, pretrained=False, frozen=False).eval()
    full = create_backbone("tf_efficientnet_lite0", pretrained=False, features_only=True).eval()
    assert len(student.model.blocks) == 5 < len(full.blocks) == 7  # layer3 is blocks.4's output
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps, want = student(images), full(images)
    assert [m.shape[1] for m in maps] == [24, 112]
    assert torch.equal(maps[0], want[1]) and torch.equal(maps[1], want[3])  # stride 4 and 16
    saved_before = {f"student.model.{k}": v for k, v in full.state_dict().items()}  # a run saved with all stages
    holder = torch.nn.Module()
    holder.student = student
    holder.load_state_dict(saved_before, strict=True)
    assert torch.equal(student.state_dict()["model.blocks.4.0.conv_pw.weight"], full.state_dict()["blocks.4.0.conv_pw.weight"])
