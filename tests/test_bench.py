"""bench.py's FLOP count, which its MFU figures rest on, against the ViT's matmuls counted by hand."""
import numpy as np
import pytest
import torch
from PIL import Image

import bench
import simdino
import simdinov2


def vit_forward_flops(D, depth, patch, size, registers=0, blocks_share=1.0):
    """blocks_share: the part of the samples the blocks compute (DINOv2's stochastic depth: kept / batch)."""
    n_patches = (size // patch) ** 2
    N = 1 + registers + n_patches                                    # tokens
    per_block = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * N * D + 2 * 2 * N * D * 4 * D  # qkv, proj, attention, mlp
    return depth * per_block * blocks_share + 2 * n_patches * D * 3 * patch * patch   # + patch embedding


def test_backbone_train_flops_counts_student_three_times_and_teacher_once():
    args = simdino.get_args(["--arch", "vit_small", "--patch_size", "16", "--num_register_tokens", "4"])
    G, L = vit_forward_flops(384, 12, 16, 224, 4), vit_forward_flops(384, 12, 16, 96, 4)
    assert bench.backbone_train_flops(args) == 3 * (2 * G + 10 * L) + 2 * G
    assert 9.2e9 < G < 9.5e9                                         # ViT-S/16 at 224 px: the usual 4.6 G multiply-adds
    crops = bench.RepeatedCrops(5, args)
    views, _ = crops[3]
    assert len(crops) == 5 and len(views) == 12 and views[0].shape == (3, 224, 224) and views[2].shape == (3, 96, 96)
    assert all(v.dtype == torch.uint8 for v in views)                   # what the loader workers send now


def test_backbone_train_flops_counts_only_the_samples_dinov2s_stochastic_depth_keeps():
    flags = ["--arch", "vit_small", "--patch_size", "16", "--batch_size_per_gpu", "10", "--local_crops_number", "10",
             "--drop_path_rate", "0.3"]
    args = simdinov2.get_args(flags)                                  # 2 x 10 globals: 14 kept; 10 x 10 locals: 70
    G, L = vit_forward_flops(384, 12, 16, 224, 4, 14 / 20), vit_forward_flops(384, 12, 16, 96, 4, 70 / 100)
    teacher = vit_forward_flops(384, 12, 16, 224, 4)
    assert bench.backbone_train_flops(args) == pytest.approx(3 * (2 * G + 10 * L) + 2 * teacher, rel=1e-12)
    everything = bench.backbone_train_flops(simdinov2.get_args(flags + ["--drop_path_mode", "dino"]))
    assert everything == pytest.approx(3 * (2 * teacher + 10 * vit_forward_flops(384, 12, 16, 96, 4)) + 2 * teacher)
    assert 0.70 < bench.backbone_train_flops(args) / everything < 0.78   # the blocks dominate: about a quarter saved


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


def test_compare_runs_the_variants_in_turns_and_prints_their_ratios(monkeypatch, capsys):
    calls = []

    def fake_child(b, method, argv):                                    # a run's record; bf16 twice as fast
        calls.append((method, argv[-1]))
        bf16 = argv[-1] == "--bf16"
        return {"method": method, "arch": "vit_tiny", "patch_size": 8, "world_size": 1, "device": "CPU", "batch": 4,
                "precision": "bf16" if bf16 else "float32", "compile": False, "grad_checkpointing": False,
                "images_per_s": (20.0 if bf16 else 10.0) + len(calls), "ms_per_step": 1.0, "memory": 2**30,
                "memory_kind": "peak RSS", "tflops": 0.1}

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr("sys.argv", ["bench.py", "simdino", "dinov2", "--compare", "bf16", "--repeats", "2",
                                     "--arch", "vit_tiny"])
    bench.main()
    runs = [("simdino", "--no-bf16"), ("simdino", "--bf16"), ("dinov2", "--no-bf16"), ("dinov2", "--bf16")]
    assert calls == runs + runs                                         # A B A B: every run once per repeat
    out = capsys.readouterr().out
    assert "simdino [--bf16] vit_tiny/8 on 1 x CPU, batch 4/process, bf16, eager: 26.0 images/s" in out   # the fastest
    assert "simdino: images/s relative to --no-bf16: --bf16 x1.73" in out                          # 26 / 15
    assert "dinov2: images/s relative to --no-bf16: --bf16 x1.65" in out                           # 28 / 17
    monkeypatch.setattr("sys.argv", ["bench.py", "simdino", "--compare", "drop_path_mode"])
    with pytest.raises(SystemExit):                                     # a flag simdino lacks: refused before any run
        bench.main()
    assert len(calls) == 8
