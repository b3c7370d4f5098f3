"""bench.py's FLOP count, which its MFU figures rest on, against the ViT's matmuls counted by hand."""
import numpy as np
import torch
from PIL import Image

import bench
import simdino


def vit_forward_flops(D, depth, patch, size, registers=0):
    n_patches = (size // patch) ** 2
    N = 1 + registers + n_patches                                    # tokens
    per_block = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * N * D + 2 * 2 * N * D * 4 * D  # qkv, proj, attention, mlp
    return depth * per_block + 2 * n_patches * D * 3 * patch * patch   # + patch embedding


def test_backbone_train_flops_counts_student_three_times_and_teacher_once():
    args = simdino.get_args(["--arch", "vit_small", "--patch_size", "16", "--num_register_tokens", "4"])
    G, L = vit_forward_flops(384, 12, 16, 224, 4), vit_forward_flops(384, 12, 16, 96, 4)
    assert bench.backbone_train_flops(args) == 3 * (2 * G + 10 * L) + 2 * G
    assert 9.2e9 < G < 9.5e9                                         # ViT-S/16 at 224 px: the usual 4.6 G multiply-adds
    crops = bench.RepeatedCrops(5, args)
    views, _ = crops[3]
    assert len(crops) == 5 and len(views) == 12 and views[0].shape == (3, 224, 224) and views[2].shape == (3, 96, 96)
    assert all(v.dtype == torch.uint8 for v in views)                   # what the loader workers send now


def test_make_jpegs_and_loader_measurement(tmp_path, capsys):
    bench.make_jpegs(str(tmp_path), 4, classes=2)
    files = sorted(p for p in tmp_path.rglob("*.jpg"))
    assert len(files) == 4 and {p.parent.name for p in files} == {"class0", "class1"}
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (500, 375)
        assert np.asarray(im).std() > 20                                # not flat: something to decode and blur
    args = simdino.get_args(["--data", str(tmp_path), "--global_crops_size", "32", "--local_crops_size", "16",
                             "--local_crops_number", "2", "--batch_size_per_gpu", "2"])
    result, decode_ms, on_device, sizes = bench.measure_loader(args, n_images=4, rounds=1)
    assert len(result) == 3 and all(a > 0 and b > 0 for a, b in result.values())
    assert set(decode_ms) == {False, True} and on_device > 0 and sizes == [(500, 375)] * 4
    step = {"method": "simdino", "images_per_s": 10.0}
    bench.print_loader(args, result, decode_ms, on_device, sizes, [step])
    out = capsys.readouterr().out
    assert "(1.00x)" in out and out.count("cores needed for simdino's 10.0 images/s") == 3
