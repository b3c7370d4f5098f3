"""--pretrained_weights: the backbones of student and teacher start from a checkpoint's ViT, the heads fresh.

The files are written the way the releases write them: DINO's main_dino.py saves the DDP student
(`module.backbone.`), the teacher (`backbone.`), heads, the optimizer, an argparse.Namespace; the DINOv2
hub files are bare backbones with registers, layerscale and a mask token. With --lr 0 (and so no weight
decay either) one step leaves both backbones equal to the file's teacher: what was loaded is what trains.
"""
import argparse
import importlib
import os

import pytest
import torch

import vit

TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--local_crops_number", "2", "--proj_hidden_dim", "32", "--proj_dim", "8", "--data", "synthetic:16",
        "--batch_size_per_gpu", "8", "--num_workers", "0", "--epochs", "1", "--epoch_length", "1",
        "--warmup_epochs", "0", "--lr", "0", "--min_lr", "0"]
OWN = {"dino": ["--out_dim", "32"], "dinov2": ["--out_dim", "32", "--layerscale", "0.1"],
       "simdino": ["--cov_group_size", "4"], "simdinov2": ["--cov_group_size", "4"]}


def source(registers, layerscale, seed=3):
    torch.manual_seed(seed)
    return vit.build_vit("vit_tiny", patch_size=8, img_size=16, num_register_tokens=registers, layerscale=layerscale)


def dino_release_file(path, model):
    """What main_dino.py saves: no mask token in DINO's ViT; the DDP student under module., heads, Namespace."""
    sd = {k: v for k, v in model.state_dict().items() if k != "mask_token"}
    other = {k: torch.randn_like(v) for k, v in sd.items()}
    head = {"head.mlp.0.weight": torch.randn(32, 192), "head.last_layer.weight_g": torch.ones(64, 1)}
    torch.save({"student": {**{f"module.backbone.{k}": v for k, v in other.items()}, **{f"module.{k}": v for k, v in head.items()}},
                "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},
                "epoch": 3, "args": argparse.Namespace(arch="vit_tiny", patch_size=8),
                "dino_loss": {"center": torch.zeros(1, 64)}}, path)
    return sd


def dinov2_hub_file(path, model):
    sd = model.state_dict()
    torch.save(sd, path)
    return sd


FILES = {"dino": (dino_release_file, 0, None), "simdino": (dino_release_file, 0, None),
         "dinov2": (dinov2_hub_file, 4, 0.1), "simdinov2": (dinov2_hub_file, 4, 0.1)}


@pytest.mark.parametrize("method", list(FILES))
def test_one_step_at_lr_0_keeps_the_files_teacher_backbone(method, tmp_path):
    mod = importlib.import_module(method)
    write, registers, layerscale = FILES[method]
    expected = write(tmp_path / "released.pth", source(registers, layerscale))
    out = tmp_path / "run"
    mod.train(mod.get_args(TINY + OWN[method] + ["--num_register_tokens", str(registers), "--output_dir", str(out),
                                                  "--pretrained_weights", str(tmp_path / "released.pth")]))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 1
    torch.manual_seed(0)
    fresh_student = mod.build_networks(mod.get_args(TINY + OWN[method] + ["--num_register_tokens", str(registers)]))[0]
    for net in ("student", "teacher"):
        for k, v in expected.items():
            assert torch.equal(ckpt[net][f"backbone.{k}"], v), (net, k)
        heads = {k: v for k, v in ckpt[net].items() if not k.startswith("backbone.")}
        assert heads and all(torch.equal(v, fresh_student.state_dict()[k]) for k, v in heads.items())  # fresh, seed 0


def test_another_architecture_gives_one_line_before_anything_is_written(tmp_path):
    import simdino
    dinov2_hub_file(tmp_path / "reg4.pth", source(4, 0.1))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        simdino.train(simdino.get_args(TINY + ["--cov_group_size", "4", "--output_dir", str(out),
                                               "--pretrained_weights", str(tmp_path / "reg4.pth")]))
    msg = str(e.value.code)
    assert msg.startswith("error: --pretrained_weights") and "\n" not in msg
    assert "4 registers, layerscale on" in msg and "0 registers, layerscale off" in msg
    assert not os.path.exists(out)
