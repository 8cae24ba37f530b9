"""EfficientAD: quantiles from held-out normal images only, the penalty stream, batch size 1, the
schedule, the fused predictor, and the teacher file's errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import fit_on, normal_images, required_streams

from adlib import Settings
from adlib.backbones.weights import MissingWeightsError, WeightsFileError
from adlib.data import DataError, load_manifest
from adlib.data.synthetic import make_dataset, make_imagenet_like
from adlib.models.base import FitContext, Step, TrainBatch
from adlib.models.components.pdn import PatchDescriptionNetwork
from adlib.models.registry import canonical_name, create_model, get_spec
from adlib.run import prepare_data, train_run
from adlib.run.loaders import auxiliary_streams

SIZE = 64
RUN = {"img_size": SIZE, "max_steps": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset("mvtec", root / "mvtec", categories=("widget",), n_train=10, n_test_good=3, n_test_bad=3,
                 size=SIZE, seed=0)
    make_imagenet_like(root, n=3, size=80)
    return root


def _settings(root, out):
    return Settings(data_root=root, output_dir=out, backbone_dir=out / "no-weights", device="cpu", seed=0)


def _prepare(root, out):
    cfg = {"name": "mvtec", "layout": "mvtec", "root": str(root / "mvtec")}
    return prepare_data(cfg, "widget", SIZE, out / "widget.parquet", out / "cache")


def _model(name="efficientad-small", **overrides):
    return create_model(name, pretrained=False, **overrides)


def test_registry_defaults_are_the_papers():
    assert canonical_name("efficientad-s") == "efficientad-small"
    assert canonical_name("efficientad-m") == "efficientad-medium"
    for name in ("efficientad-small", "efficientad-medium"):
        spec = get_spec(name)
        assert spec.family == "distillation"
        train = spec.train
        assert (train.num_epochs, train.max_steps, train.batch_size, train.img_size, train.validation_fraction) == \
            (None, 70_000, 1, 256, 0.1)
    assert get_spec("efficientad-medium").model_defaults["model_size"] == "medium"
    defaults = get_spec("efficientad-small").model_defaults
    assert (defaults["lr"], defaults["weight_decay"], defaults["hard_quantile"], defaults["map_quantiles"]) == \
        (1e-4, 1e-5, 0.999, [0.9, 0.995])


def test_quantiles_come_from_held_out_training_images_never_the_test_split(data_root, tmp_path):
    root = tmp_path / "root"  # a data set of its own: its test images are overwritten below
    make_dataset("mvtec", root / "mvtec", categories=("widget",), n_train=10, n_test_good=3, n_test_bad=3,
                 size=SIZE, seed=0)
    (root / "imagenette2").symlink_to(data_root / "imagenette2")
    data_root = root
    manifest = _prepare(data_root, tmp_path)
    first = train_run(manifest, "efficientad-small", RUN, tmp_path / "a", _settings(data_root, tmp_path),
                      pretrained=False, progress=False)
    # the quantiles are those of the raw maps over exactly the held-out validation images
    model = _model()
    model.load_saved_state(load_file(str(first / "model.safetensors")))
    held_out = json.loads((first / "splits.json").read_text())["validation"]
    assert len(held_out) == 1  # 10 % of 10 training images
    frame = load_manifest(manifest)
    assert set(held_out) <= set(frame[frame.split == "train"].image_path)
    from adlib.data import ImageDataset

    data = ImageDataset(frame[frame.image_path.isin(held_out)].reset_index(drop=True), SIZE, normalize=False)
    structural, logical = model.raw_maps(torch.stack([data[i]["image"] for i in range(len(data))]))
    expected = [np.quantile(m.flatten().double().numpy(), (0.9, 0.995)) for m in (structural, logical)]
    torch.testing.assert_close(model.map_quantiles, torch.tensor(np.array(expected), dtype=torch.float32))

    # other test images: the same quantiles and teacher statistics
    for path in frame[frame.split == "test"].image_path:
        from PIL import Image

        Image.fromarray(np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)).save(path)
    second = train_run(_prepare(data_root, tmp_path / "b"), "efficientad-small", RUN, tmp_path / "b" / "run",
                       _settings(data_root, tmp_path), pretrained=False, progress=False)
    a, b = (load_file(str(run / "model.safetensors")) for run in (first, second))
    for key in ("map_quantiles", "teacher_mean", "teacher_std"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    provenance = json.loads((second / "provenance.json").read_text())
    assert provenance["validation"] == "validation"
    penalty = provenance["auxiliary"]["penalty"]
    assert penalty.startswith("folder:") and "imagenette2" in penalty
    assert "for tests only" in provenance["teacher"]["source"] and "teacher_warning" in provenance


def test_the_penalty_stream_yields_the_declared_images_one_at_a_time(data_root):
    from adlib.data.auxiliary import AuxiliaryImages

    model = _model()
    (stream,) = model.auxiliary_streams()
    assert (stream.name, stream.source, stream.batch_size, stream.fallback) == ("penalty", "imagenet", 1, None)
    streams, sources = auxiliary_streams(model, {"img_size": SIZE, "batch_size": 1}, _settings(data_root, data_root))
    folder = data_root.resolve() / "imagenette2" / "train"
    assert sources == {"penalty": f"folder:{folder}"}
    declared = AuxiliaryImages(folder, SIZE)
    images = torch.stack([declared[i] for i in range(len(declared))])
    for _ in range(6):
        batch = next(streams["penalty"])
        assert batch.shape == (1, 3, SIZE, SIZE)
        assert (batch - images).flatten(1).abs().amax(1).min() == 0  # one of the folder's images, decoded

    # the penalty term is the student's mean squared teacher-half output on that image
    model.setup_fit(FitContext(device=torch.device("cpu"), seed=0, num_train_images=1, steps_per_epoch=1))
    model.penalty_grayscale = 0.0
    penalty = images[:1]
    out = model.training_step(TrainBatch.of(normal_images(1, SIZE), aux={"penalty": penalty}), Step(0, 0, 1))
    with torch.no_grad():
        expected = model.student(model.normalize_input(penalty))[:, :model.teacher_channels].square().mean()
    torch.testing.assert_close(out["penalty"], expected)
    with pytest.raises(ValueError, match="auxiliary stream 'penalty'"):
        model.training_step(TrainBatch.of(normal_images(1, SIZE)), Step(0, 0, 1))


def test_a_missing_or_empty_imagenet_folder_stops_the_run_naming_folder_and_fix(data_root, tmp_path):
    root = tmp_path / "root"
    (root / "imagenette2" / "train" / "n01440764").mkdir(parents=True)  # present, but empty
    (root / "mvtec").symlink_to(data_root / "mvtec")
    manifest = _prepare(root, tmp_path)
    for case in ("empty", "missing"):
        if case == "missing":
            (root / "imagenette2" / "train" / "n01440764").rmdir()
            (root / "imagenette2" / "train").rmdir()
        with pytest.raises(DataError) as err:
            train_run(manifest, "efficientad-small", RUN, tmp_path / case, _settings(root, tmp_path),
                      pretrained=False, progress=False)
        text = str(err.value)
        assert "EfficientAd" in text and "'penalty'" in text and "imagenette2/train" in text and "To fix" in text
        assert ("no images in class sub-folders" if case == "empty" else "(missing)") in text
        assert not (tmp_path / case).exists()  # refused before any training


def test_a_batch_size_other_than_one_is_refused_before_any_work():
    model = _model()
    before = model.teacher_mean.clone()
    with pytest.raises(ValueError, match=r"batch size is 4\. Set batch_size=1"):
        fit_on(model, normal_images(8, SIZE), batch_size=4, num_epochs=None, max_steps=2,
               validation=normal_images(2, SIZE), aux=required_streams(model, SIZE))
    assert torch.equal(model.teacher_mean, before)  # the teacher pass never ran


def test_the_learning_rate_drops_tenfold_at_95_percent_of_the_steps():
    model = _model()
    model.setup_fit(FitContext(device=torch.device("cpu"), total_steps=100))
    (spec,) = model.configure_optimizers()
    assert spec.interval == "step" and isinstance(spec.optimizer, torch.optim.Adam)
    assert spec.optimizer.param_groups[0]["weight_decay"] == 1e-5
    rates = []
    for _ in range(100):
        rates.append(spec.optimizer.param_groups[0]["lr"])
        spec.optimizer.step()
        spec.scheduler.step()
    assert rates[94] == pytest.approx(1e-4) and rates[95] == pytest.approx(1e-5) and rates[99] == pytest.approx(1e-5)


def test_the_fused_predictor_computes_the_papers_maps_and_follows_weight_changes():
    model = _model(predict_dtype="float32").eval()
    torch.manual_seed(0)
    model.teacher_mean.normal_()
    model.teacher_std.uniform_(0.5, 2.0)
    images = normal_images(2, SIZE, seed=3)
    c = model.teacher_channels
    with torch.no_grad():
        x = model.normalize_input(images)
        teacher = (model.teacher(x) - model.teacher_mean.view(1, -1, 1, 1)) / model.teacher_std.view(1, -1, 1, 1)
        student = model.student(x)
        reconstruction = model.autoencoder(x, teacher.shape[-2:])
        expected = ((teacher - student[:, :c]).square().mean(1), (reconstruction - student[:, c:]).square().mean(1))
    got = model.raw_maps(images)
    for a, b in zip(got, expected):
        assert a.shape == (2, 8, 8)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.predict_dtype = "bfloat16"
    for a, b in zip(model.raw_maps(images), expected):
        torch.testing.assert_close(a, b, rtol=0.05, atol=1e-3)
    model.predict_dtype = "float32"
    with torch.no_grad():
        model.student.conv1.weight.mul_(1.5)
    assert not torch.allclose(model.raw_maps(images)[0], got[0])  # the cached copy was rebuilt

    out = model.predict(images)  # padded by the 4 cells an unpadded PDN loses, resized to the image
    assert out.maps.shape == (2, SIZE, SIZE)
    torch.testing.assert_close(out.scores, out.maps.flatten(1).amax(1))


def test_a_missing_teacher_names_the_file_and_both_ways_to_get_it(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        create_model("efficientad-small", backbone_dir=tmp_path)
    text = str(err.value)
    assert "efficientad_teacher_small.pth" in text and "efficientad_pretrained_weights.zip" in text
    assert "adlib backbones distill-teacher --size small" in text


def test_teacher_files_load_in_both_layouts_and_a_wrong_shape_is_a_clear_error(tmp_path):
    reference = PatchDescriptionNetwork("small", 384)
    sequential = {}  # the reference code's nn.Sequential numbering: convolutions at 0, 3, 6, 8
    for index, n in zip((0, 3, 6, 8), range(1, 5)):
        conv = getattr(reference, f"conv{n}")
        sequential[f"{index}.weight"], sequential[f"{index}.bias"] = conv.weight.detach(), conv.bias.detach()
    torch.save(sequential, tmp_path / "pretrained_teacher_small.pth")
    model = create_model("efficientad-s", backbone_dir=tmp_path)
    torch.testing.assert_close(model.teacher.conv4.weight, reference.conv4.weight, rtol=0, atol=0)
    assert model.provenance()["teacher"]["source"].endswith("pretrained_teacher_small.pth")
    assert "teacher_warning" not in model.provenance()

    medium = {k: v.contiguous() for k, v in PatchDescriptionNetwork("medium", 384).state_dict().items()}
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file(medium, str(wrong / "efficientad_teacher_small.safetensors"))
    with pytest.raises(WeightsFileError) as err:
        create_model("efficientad-small", backbone_dir=wrong)
    text = str(err.value)
    assert str(wrong / "efficientad_teacher_small.safetensors") in text and "wrong shapes" in text
    assert "not a PDN-small teacher" in text and "distill-teacher --size small" in text


def test_the_hard_feature_quantile_equals_torch_quantile():
    from adlib.models.efficientad import quantile

    values = torch.rand(1, 7, 13, 11, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.999, 1.0):
        torch.testing.assert_close(quantile(values, q), torch.quantile(values, q))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="model_size"):
        _model(model_size="large")
    with pytest.raises(ValueError, match="map_quantiles"):
        _model(map_quantiles=[0.995, 0.9])
    with pytest.raises(ValueError, match="predict_dtype"):
        _model(predict_dtype="float16")
