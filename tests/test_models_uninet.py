"""UniNet: the two teachers and their learning rates, the schedule, the mask/label-aware
contrastive loss, feature selection and the weighted decision score."""
from __future__ import annotations

import pytest
import torch
from tiny import fit_on, normal_images, with_defect

from adlib.models import TrainBatch, create_model, resolve_config
from adlib.models.base import FitContext, Step
from adlib.models.registry import get_spec
from adlib.models.uninet import (DomainFeatureSelection, SplitKernelBottleneck, anomalous_positions,
                                 contrastive_pair_loss, own_position_log_prob, weighted_decision_scores)

SMALL = {"backbone": "resnet10t", "bottleneck_blocks": 1, "decoder_blocks": (1, 1, 1), "width_ratio": 0.25}


def small_uninet(name: str = "uninet", **overrides):
    return create_model(name, pretrained=False, **{**SMALL, **overrides})


def test_uninet_defaults_follow_the_official_code():
    one, multi = resolve_config("uninet"), resolve_config("uninet-multiclass")
    assert get_spec("uninet").family == "foundation" and get_spec("uninet").scope == "category"
    assert one.model["backbone"] == "wide_resnet50_2" and one.model["layers"] == ["layer1", "layer2", "layer3"]
    assert (one.model["lr"], one.model["teacher_lr"], one.model["weight_decay"]) == (5e-3, 1e-6, 1e-5)
    assert (one.model["temperature"], one.model["lr_milestones"], one.model["amsgrad"]) == (2.0, [], False)
    assert (one.train["num_epochs"], one.train["batch_size"], one.train["img_size"]) == (100, 8, 256)
    assert get_spec("uninet-multiclass").scope == "dataset"
    assert (multi.model["temperature"], multi.model["lr_milestones"], multi.model["amsgrad"]) == (0.1, [0.8], True)
    assert (multi.train["num_epochs"], multi.train["max_steps"], multi.model["eps"]) == (None, 5000, 1e-10)


def test_target_teacher_has_its_own_tiny_learning_rate_and_the_schedule_is_per_step():
    model = small_uninet("uninet-multiclass")
    model.setup_fit(FitContext(device=torch.device("cpu"), total_steps=10))
    (spec,) = model.configure_optimizers()
    student_group, teacher_group = spec.optimizer.param_groups
    assert isinstance(spec.optimizer, torch.optim.AdamW) and spec.interval == "step"
    assert teacher_group["lr"] == 1e-6 and student_group["lr"] == 5e-3 and teacher_group["amsgrad"]
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(teacher_group["params"]) == ids(model.target_teacher.parameters())
    assert ids(student_group["params"]) == ids([*model.student.parameters(), *model.bottleneck.parameters(),
                                                *model.feature_selection.parameters()])
    assert not ids(model.source_teacher.parameters()) & ids([*student_group["params"], *teacher_group["params"]])
    for _ in range(8):  # the milestone sits at 80 % of the 10 steps
        spec.optimizer.step()
        spec.scheduler.step()
    assert [g["lr"] for g in spec.optimizer.param_groups] == pytest.approx([1e-3, 2e-7])


def test_training_moves_the_target_teacher_slightly_and_leaves_the_source_alone():
    model = small_uninet()
    source_before = {k: v.clone() for k, v in model.source_teacher.state_dict().items()}
    target_before = {k: v.clone() for k, v in model.target_teacher.state_dict().items()}
    images = normal_images(2, 64)
    with torch.no_grad():  # same initial weights (the frozen source's batch norms are folded)
        for s, t in zip(model.source_teacher(images), model.target_teacher.eval()(images)):
            assert float((s - t).abs().max()) <= 1e-5 * float(t.abs().max())
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    report = fit_on(model, normal_images(4, 64), batch_size=4, num_epochs=3)
    assert report.loss_history[-1] < report.loss_history[0]
    assert all(torch.equal(v, source_before[k]) for k, v in model.source_teacher.state_dict().items())
    target = model.target_teacher.state_dict()
    weights = [k for k in target if k.endswith("weight")]
    drift = max(float((target[k] - target_before[k]).abs().max()) for k in weights)
    assert 0 < drift < 1e-4  # three AdamW steps at lr 1e-6
    assert any(not torch.equal(target[k], target_before[k]) for k in target if k.endswith("running_mean"))
    student_drift = max(float((v - student_before[k]).abs().max()) for k, v in model.student.state_dict().items()
                        if k.endswith("weight"))
    assert student_drift > 100 * drift
    assert not any(k.startswith("source_teacher.") for k in model.saved_state())
    assert any(k.startswith("target_teacher.") for k in model.saved_state())


def test_anomalous_positions_come_from_masks_or_labels():
    masks = torch.zeros(3, 1, 8, 8)
    masks[1, :, :4, :4] = 1
    labels = torch.tensor([0, 1, 1])  # image 2: labelled anomalous without a mask
    positions = anomalous_positions(masks, labels, (2, 2))
    assert positions.tolist() == [[False] * 4, [True, False, False, False], [True] * 4]


def test_contrastive_loss_terms_and_their_use_of_anomalous_positions():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 4, 3, 3, generator=g)
    normal = torch.zeros(2, 9, dtype=torch.bool)
    options = {"temperature": 0.5, "margin": 1.0, "cosine_weight": 0.7}
    identical = contrastive_pair_loss(teacher, teacher, normal, **options)
    s = torch.nn.functional.normalize(teacher.flatten(2).transpose(1, 2), dim=-1)
    prob = torch.softmax(s @ s.transpose(1, 2) / 0.5, dim=-1).diagonal(dim1=1, dim2=2)
    want = 0.3 * -prob.log().mean() + (1 - prob).mean()  # cosine term is 0 for identical features
    torch.testing.assert_close(identical, want)
    student = torch.randn(2, 4, 3, 3, generator=g)
    some = normal.clone()
    some[0, :4] = True
    assert contrastive_pair_loss(teacher, student, some, **options) != contrastive_pair_loss(teacher, student, normal,
                                                                                             **options)
    # through the model: labelled anomalous training images change the loss
    model = small_uninet()
    images = with_defect(normal_images(2, 64))
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, :32, :32] = 1
    with torch.no_grad():
        plain = model.training_step(TrainBatch.of(images), Step(0, 0, 1))
        labelled = model.training_step(TrainBatch.of(images, torch.ones(2, dtype=torch.long), masks), Step(0, 0, 1))
    assert plain != labelled


def test_blockwise_contrastive_similarities_match_the_full_matrix():
    g = torch.Generator().manual_seed(1)
    s = torch.nn.functional.normalize(torch.randn(2, 10, 3, generator=g), dim=-1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(2, 10, 3, generator=g), dim=-1).requires_grad_()
    full = torch.log_softmax(s @ t.transpose(1, 2) / 0.1, dim=-1).diagonal(dim1=1, dim2=2)
    blocks = own_position_log_prob(s, t, 0.1, block=2 * 10 * 3)  # 3 rows at a time, 4 blocks
    torch.testing.assert_close(blocks, full)
    weights = torch.rand(2, 10, generator=g)
    grads_full = torch.autograd.grad((full * weights).sum(), (s, t))
    grads_blocks = torch.autograd.grad((blocks * weights).sum(), (s, t))
    for a, b in zip(grads_full, grads_blocks):
        torch.testing.assert_close(a, b)


def test_feature_selection_weights_students_by_the_teachers_spatial_softmax():
    dfs = DomainFeatureSelection([2, 3])
    t = [torch.randn(1, 2, 2, 2), torch.randn(1, 3, 1, 2)]
    s = [torch.randn(1, 2, 2, 2), torch.randn(1, 3, 1, 2)]
    out = dfs(s + s, t + t)  # four pairs share the two levels' theta
    assert len(out) == 4 and len(list(dfs.parameters())) == 2
    want = s[0] * torch.softmax(t[0].flatten(2), -1).view_as(t[0]) * (1.0 + t[0].mean((-2, -1), keepdim=True))
    torch.testing.assert_close(out[0], want)  # theta starts at clamp(sigmoid(0) + 0.5, max=1) = 1
    torch.testing.assert_close(out[2], want)


def test_weighted_decision_takes_the_mean_of_the_top_k_smoothed_values():
    low_res = [torch.tensor([[[0.1, 0.4]]]), torch.tensor([[[0.2, 2.0]]]), torch.tensor([[[0.0, 1.0]]])]
    smoothed = torch.arange(100.0).view(1, 10, 10)
    # maxima 0.4 / 2.0 / 1.0: softmax keeps 2.0 only; k = 100 * max(0.5 * 2.0, 0) = 100 -> mean of all
    assert weighted_decision_scores(low_res, smoothed, alpha=0.5, beta=0.0).item() == pytest.approx(49.5)
    # k = floor(100 * 0.055) = 5 -> mean of 99..95
    assert weighted_decision_scores(low_res, smoothed, alpha=0.0275, beta=0.0).item() == pytest.approx(97.0)
    # beta is the floor of the fraction; k is at least 1
    assert weighted_decision_scores(low_res, smoothed, alpha=0.0, beta=0.035).item() == pytest.approx(98.0)
    assert weighted_decision_scores(low_res, smoothed, alpha=0.0, beta=0.0).item() == pytest.approx(99.0)


def test_uninet_runs_on_the_pip_backbones():
    lite = small_uninet(backbone="tf_efficientnet_lite0")
    assert lite.source_teacher.channels == [24, 40, 112] and lite.bottleneck.out_channels == 224
    assert lite.eval().predict(normal_images(1, 64)).maps.shape == (1, 64, 64)
    mobile = small_uninet(backbone="mobilenetv2_100")
    assert mobile.source_teacher.channels == [24, 32, 96]
    fit_on(mobile, normal_images(2, 64), batch_size=2, max_steps=1)
    out = mobile.eval().predict(normal_images(1, 64))
    assert out.maps.shape == (1, 64, 64) and torch.isfinite(out.scores).all()


def test_uninet_refuses_bad_options():
    with pytest.raises(ValueError, match="split their channels|splits its channels"):
        SplitKernelBottleneck(5, 4, 8)
    with pytest.raises(ValueError, match="lr_milestones"):
        small_uninet(lr_milestones=[80])
    with pytest.raises(ValueError, match=r"valid layers: \['act1', 'layer1'"):
        small_uninet(layers=("layer1", "layer2", "layer5x"))

