"""bench.py's FLOP count, which its MFU figures rest on, against the ViT's matmuls counted by hand."""
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
