import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import visualize_attention as va
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peaked(model, scale=8.0):
    """Random weights with attention far from uniform (at init, q.k ~ 0 and every softmax is nearly flat, where a
    wrong scale or a wrong axis would go unnoticed); layerscale away from 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(scale)
            if isinstance(blk.ls1, vit.LayerScale):
                blk.ls1.gamma.uniform_(0.5, 1.5)
                blk.ls2.gamma.uniform_(0.5, 1.5)
        for p in (model.pos_embed, model.cls_token):
            p.normal_()
    return model.eval()


@pytest.mark.parametrize("registers, layerscale", [(0, None), (4, 0.1)])
def test_explicit_last_block_equals_the_fused_block(registers, layerscale):
    model = peaked(vit.vit_tiny(patch_size=4, img_size=16, num_register_tokens=registers,
                                layerscale=layerscale).double())
    x = model.prepare_tokens(torch.randn(2, 3, 16, 24, dtype=torch.float64))     # 4x6 grid: resized positions
    with torch.no_grad():
        for blk in model.blocks[:-1]:
            x = blk(x)
        fused = model.blocks[-1](x)                                               # the training path (SDPA)
        attn, explicit = va.block_attention(model.blocks[-1], x)
    assert attn.shape == (2, 3, 1 + registers + 24, 1 + registers + 24) and attn.dtype == torch.float64
    assert attn.max() > 0.5                                                       # peaked: the test can tell
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-6)
    assert (fused - x).abs().max() > 1e-2                                         # the block does change x
    # the same computation with a wrong scale (1/head_dim) is far off: the tolerance above is meaningful
    blk, (B, T, D) = model.blocks[-1], x.shape
    q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(B, T, 3, 3, D // 3).permute(2, 0, 3, 1, 4)
    wrong = torch.softmax(q @ k.transpose(-2, -1) / (D // 3), dim=-1)
    assert (wrong - attn).abs().max() > 1e-2


def test_probabilities_sum_to_one_and_registers_are_left_out():
    model = peaked(vit.vit_tiny(patch_size=4, img_size=16, num_register_tokens=4).double())
    images = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    attn = va.last_attention(model, images)                                       # (2, 3, 1 + 4 + 24, same)
    assert attn.shape == (2, 3, 29, 29) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 29, dtype=torch.float64), rtol=0, atol=1e-12)
    assert attn[:, :, 0, 1:5].sum() > 1e-3                                        # the CLS token does look at registers
    maps = va.cls_attention_maps(model, images)
    assert maps.shape == (2, 3, 4, 6)                                             # H/p x W/p, no register entries
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    cls_to_patches = attn[:, :, 0, 5:]
    torch.testing.assert_close(maps.flatten(-2), cls_to_patches / cls_to_patches.sum(-1, keepdim=True))
    # row-major patch order: map[i, j] is patch i * 6 + j of the image
    torch.testing.assert_close(maps[1, 2, 3, 1], cls_to_patches[1, 2, 3 * 6 + 1] / cls_to_patches[1, 2].sum())


def test_threshold_keeps_the_smallest_set_holding_the_mass():
    torch.manual_seed(0)
    maps = torch.rand(5, 7, 9, dtype=torch.float64) ** 4
    for t in (0.1, 0.6, 0.9, 1.0):
        keep = va.threshold_mask(maps, t)
        for m, k in zip(maps, keep):
            mass = m / m.sum()
            assert mass[k].sum() >= t - 1e-6                                      # holds the fraction ...
            assert mass[k].sum() - mass[k].min() < t                              # ... and no patch could go
            assert mass[k].min() >= mass[~k].max() if (~k).any() else True        # the largest ones


def test_threshold_example_by_hand():
    mass = torch.tensor([[0.05, 0.10], [0.25, 0.60]])
    assert va.threshold_mask(mass, 0.6).tolist() == [[False, False], [False, True]]    # 0.60 alone reaches 0.6
    assert va.threshold_mask(mass, 0.7).tolist() == [[False, False], [True, True]]     # 0.85
    assert va.threshold_mask(mass, 0.9).tolist() == [[False, True], [True, True]]      # 0.95
    assert va.threshold_mask(mass * 7, 0.9).tolist() == [[False, True], [True, True]]  # any scale


def test_colormap_and_drawing():
    np.testing.assert_allclose(va.colormap(np.array([0.0, 0.5, 1.0])), va.VIRIDIS[[0, 4, 8]])
    np.testing.assert_allclose(va.colormap(np.array(1 / 16)), (va.VIRIDIS[0] + va.VIRIDIS[1]) / 2)
    assert va.upsample(np.array([[1, 2]]), 3).tolist() == [[1, 1, 1, 2, 2, 2]] * 3
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    out = va.overlay(image, np.array([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]), 2)
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 4], np.round((0.4 * 100 / 255 + 0.6 * va.VIRIDIS[8]) * 255))   # the maximum
    np.testing.assert_array_equal(out[3, 0], np.round((0.4 * 100 / 255 + 0.6 * va.VIRIDIS[0]) * 255))   # the minimum
    dark = va.masked(image, np.array([[True, False, False], [False, False, False]]), 2)
    assert dark[0, 0].tolist() == [100] * 3 and dark[1, 1].tolist() == [100] * 3 and dark[0, 2].tolist() == [20] * 3
    tiles = va.montage([[image, image], [image]])
    assert tiles.shape == (4 + 2 + 4, 6 + 2 + 6, 3) and (tiles[4:6] == 255).all() and (tiles[6:, 8:] == 255).all()


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A register model in this project's layout and a DINO / SimDINO release training checkpoint (no registers)."""
    d = tmp_path_factory.mktemp("ckpt")
    own = peaked(vit.vit_tiny(patch_size=4, img_size=16, num_register_tokens=4, layerscale=0.1))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in own.state_dict().items()},
                "args": {"arch": "vit_tiny", "patch_size": 4, "interpolate_offset": 0.0,
                         "interpolate_antialias": True}},
               d / "own_reg4.pth")
    torch.manual_seed(1)
    teacher, student = vit.vit_tiny(patch_size=16, img_size=32), vit.vit_tiny(patch_size=16, img_size=32)
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},   # main_dino.py's layout
                            "head.mlp.0.weight": torch.zeros(16, 192)},
                "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                "epoch": 4, "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
                "dino_loss": {"center": torch.zeros(1, 16)}},
               d / "dino_release.pth")
    images = d / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(images / "cat.png")
    Image.fromarray(rng.integers(0, 255, (20, 50, 3), dtype=np.uint8)).save(images / "dog.jpg")
    os.makedirs(images / "other")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert("L").save(images / "other" / "cat.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    return {"own": str(d / "own_reg4.pth"), "release": str(d / "dino_release.pth"),
            "images": [str(images / "cat.png"), str(images / "dog.jpg"), str(images / "other" / "cat.png")],
            "broken": str(images / "broken.jpg")}


def test_output_names():
    assert va.output_names(["a/x.jpg", "b/x.png", "y.jpg"]) == ["a-x", "b-x", "y"]
    assert va.output_names(["a/x.jpg", "b/x.png", "a/x.png"]) == ["a-x", "b-x", "a-x-2"]


def heads_and_labels(n):
    return ["mean"] + [f"head{j}" for j in range(n)]


@pytest.mark.parametrize("which, size, grid", [("own", ["26", "21"], (6, 5)), ("release", ["48"], (3, 3))])
def test_cli_writes_the_maps(which, size, grid, checkpoints, tmp_path, capsys):
    out = tmp_path / "attn"
    va.cli(["--checkpoint", checkpoints[which], "--images", *checkpoints["images"], "--image_size", *size,
            "--output_dir", str(out), "--threshold", "0.5"])
    model = vit.vit_from_checkpoint(checkpoints[which]).eval()
    p = model.patch_size
    h, w = grid[0] * p, grid[1] * p                                               # rounded down to the patch grid
    assert f"a {grid[0]}x{grid[1]} patch grid" in capsys.readouterr().out
    names = ["images-cat", "dog", "other-cat"]                                    # two images named cat
    assert sorted(os.listdir(out)) == sorted(names + ["montage.png"])
    expected = {"img.png", "attn.pt"} | {f"{kind}-{label}.png" for kind in ("attn", "mask")
                                         for label in heads_and_labels(3)}
    for name in names:
        assert set(os.listdir(out / name)) == expected
        for f in expected - {"attn.pt"}:
            with Image.open(out / name / f) as img:
                assert (img.size, img.mode) == ((w, h), "RGB"), f
    with Image.open(out / "montage.png") as img:                                  # 3 rows of image, mean, 3 heads, mask
        assert img.size == (6 * w + 5 * 2, 3 * h + 2 * 2)
    saved = torch.load(out / "images-cat" / "attn.pt")
    assert saved["heads"].shape == (3, *grid) and saved["masks"].shape == (4, *grid) and saved["patch_size"] == p
    torch.testing.assert_close(saved["heads"].sum((-2, -1)), torch.ones(3))
    torch.testing.assert_close(saved["mean"], saved["heads"].mean(0))
    # the maps are those of the loaded model on the resized, normalised image
    image = np.asarray(Image.open(out / "images-cat" / "img.png"))
    with Image.open(checkpoints["images"][0]) as src:
        np.testing.assert_array_equal(image, np.asarray(src.convert("RGB").resize((w, h), Image.BICUBIC)))
    x = (torch.tensor(image).permute(2, 0, 1).float() / 255 - torch.tensor(va.IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(va.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(saved["heads"], va.cls_attention_maps(model, x[None])[0])
    # the brightest patch of the mean map is drawn in the colormap's top colour over the image
    i, j = divmod(saved["mean"].argmax().item(), grid[1])
    attn_png = np.asarray(Image.open(out / "images-cat" / "attn-mean.png")).astype(float)
    expected_px = np.round((0.4 * image[i * p, j * p] / 255 + 0.6 * va.VIRIDIS[-1]) * 255)
    np.testing.assert_array_equal(attn_png[i * p, j * p], expected_px)
    mask_png = np.asarray(Image.open(out / "images-cat" / "mask-mean.png"))
    kept = saved["masks"][0]
    assert kept[i, j] and (mask_png[i * p, j * p] == image[i * p, j * p]).all()
    mass = saved["mean"] / saved["mean"].sum()
    assert mass[kept].sum() >= 0.5 and mass[kept].sum() - mass[kept].min() < 0.5


def test_cli_teacher_and_student_differ(checkpoints, tmp_path):
    for key in ("teacher", "student"):
        va.cli(["--checkpoint", checkpoints["release"], "--checkpoint_key", key, "--images", checkpoints["images"][0],
                "--image_size", "32", "--output_dir", str(tmp_path / key)])
    t, s = (torch.load(tmp_path / key / "cat" / "attn.pt")["heads"] for key in ("teacher", "student"))
    assert t.shape == s.shape == (3, 2, 2) and not torch.allclose(t, s)


@pytest.mark.parametrize("case", ["threshold", "small", "missing image", "image_size count"])
def test_bad_input_in_process(case, checkpoints, tmp_path, capsys):
    argv, phrase = {"threshold": (["--threshold", "1.5"], "--threshold 1.5 must be in (0, 1]"),
                    "small": (["--image_size", "3"], "smaller than the checkpoint's patch size 4"),
                    "missing image": (["--images", str(tmp_path / "nope.jpg")], "does not exist"),
                    "image_size count": (["--image_size", "8", "8", "8"], "one value or two")}[case]
    base = {"--checkpoint": checkpoints["own"], "--images": checkpoints["images"][0], "--output_dir": str(tmp_path)}
    for flag in argv[::2]:
        base.pop(flag, None)
    full = [a for kv in base.items() for a in kv] + argv
    with pytest.raises(SystemExit) as e:
        va.cli(full)
    assert str(e.value).startswith("error: ") and phrase in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "montage.png").exists()


def test_bad_input_from_the_command_line(checkpoints, tmp_path):
    """Run as a user does: one `error:` line, a non-zero exit, no traceback (the two run side by side)."""
    cases = [(["--checkpoint", str(tmp_path / "nope.pth"), "--images", checkpoints["images"][0]], "does not exist"),
             (["--checkpoint", checkpoints["own"], "--images", checkpoints["images"][0], checkpoints["broken"]],
              "broken.jpg' could not be read (UnidentifiedImageError)")]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "visualize_attention.py"), *argv, "--output_dir",
                               str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for argv, _ in cases]
    for proc, (_, phrase) in zip(procs, cases):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and phrase in stderr, stderr
    assert not (tmp_path / "out").exists()                                        # nothing written before the check
