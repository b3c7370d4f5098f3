"""DINOv2, 1 process vs 2 and 4 (gloo, CPU), one training step on the same global batch, under DDP
(Sinkhorn-Knopp) and FSDP2 (centering): loss, gradients before and after clipping and the centres equal;
each run's update is AdamW's on its clipped gradients (tests/dist_step.py).

The DINO and iBOT terms match: their targets come from all-reduced statistics (Sinkhorn-Knopp's
sums and sample counts, the centres' sums and counts), the DINO term is a mean over equal
per-process batches, and the iBOT term's divisor is the per-process number of crops, equal on
every process, so DDP's gradient average is the 1-process gradient. KoLeo does NOT match: as in
DINOv2, each process takes nearest neighbours within its own images only, so the regulariser
depends on the per-GPU batch. The equality is checked with --koleo_loss_weight 0, and the KoLeo
difference is shown.
"""
import pytest
import torch
import torch.distributed as dist

import dinov2
from dist_step import BF16_ONE_VS_N, BF16_VS_FLOAT32, assert_grads_close, assert_grads_within, autocast, \
    check_clipping_per_part, check_update, init, needs_native_bf16, record_step, share, spawn

GLOBAL_BATCH, K = 8, 24
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "32", "--proj_dim", "8", "--out_dim", str(K), "--drop_path_rate", "0",
        "--koleo_loss_weight", "0"]
CASES = [("sinkhorn_knopp", False), ("centering", True)]         # (--centering, FSDP2 instead of DDP)


def one_step(rank, world_size, bf16, port, out):
    """One step on this process's share of a fixed global batch, for each case in turn; bf16: as train() runs
    --bf16."""
    init(rank, world_size, port)
    results = {}
    for centering, fsdp in CASES:
        args = dinov2.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size), "--centering", centering]
                               + (["--fsdp"] if fsdp else []))
        torch.manual_seed(0)
        student, teacher = dinov2.build_networks(args)
        model = dinov2.distribute(student, teacher, args, world_size, bf16)
        groups = dinov2.param_groups(student, 0.9, 0.2)   # before the forward, as in train(): FSDP2 swaps parameters
        g = torch.Generator().manual_seed(1)
        xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
        m = torch.rand(2, GLOBAL_BATCH, 4, generator=g) < 0.4                  # (M_glo, B, N): uneven per process
        center, patch_center = torch.randn(1, K, generator=g), torch.randn(1, K, generator=g)   # as after some steps
        xg, xl, m = share(xg, rank, world_size), share(xl, rank, world_size), share(m, rank, world_size).flatten(0, 1)
        idx, w = m.flatten().nonzero().squeeze(1), dinov2.patch_weights(m)

        with autocast(bf16):
            zsg, Zsg, zsl, ysg = model(xg, idx, m, xl)
            with torch.no_grad():
                ztg, Ztg = teacher(xg, idx)
                pt, Pt = dinov2.teacher_targets(ztg, Ztg, 0.05, centering, center, patch_center, 0.9)
            loss, dino_term, ibot_term, koleo_term = dinov2.dinov2_loss(zsg, zsl, pt, Zsg, Pt, w, ysg, 0.1, 1.0, 1.0,
                                                                        args.koleo_loss_weight)
        terms = torch.stack([dino_term, ibot_term, koleo_term])
        if world_size > 1:
            dist.all_reduce(terms)
            terms /= world_size
        results[centering] = record_step(dinov2, student, teacher, loss, groups, world_size, terms=terms,
                                         center=center, patch_center=patch_center)
    if rank == 0:
        torch.save(results, out)
    if world_size > 1:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return spawn(one_step, 1, tmp_path_factory.mktemp("single") / "one.pt", False)


def test_one_process_step(single):
    for centering, _ in CASES:
        check_clipping_per_part(single[centering], ["backbone.", "dino_head."])
        check_update(single[centering], centering)
    # the centres moved only under centering; Sinkhorn-Knopp leaves them alone
    g = torch.Generator().manual_seed(1)
    torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    torch.rand(2, GLOBAL_BATCH, 4, generator=g)
    initial = torch.randn(1, K, generator=g)
    torch.testing.assert_close(single["sinkhorn_knopp"]["center"], initial, rtol=0, atol=0)
    assert not torch.allclose(single["centering"]["center"], initial)


@pytest.mark.parametrize("world_size", [2, 4])
def test_one_vs_n_processes(single, world_size, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", False)
    for centering, _ in CASES:
        one, two = single[centering], n[centering]
        # loss, DINO, iBOT: equal; KoLeo (weight 0 here): computed per process, so NOT equal
        torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6, msg=centering)
        torch.testing.assert_close(two["terms"][:2], one["terms"][:2], rtol=1e-5, atol=1e-6, msg=centering)
        assert abs(two["terms"][2] - one["terms"][2]) > 1e-3       # far above rounding (1e-6), whatever the init
        assert one["terms"][1] > 0 and one["grads"]["backbone.mask_token"].abs().sum() > 0   # masking reached the loss
        for name in ("center", "patch_center"):
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=f"{centering} {name}")
        assert_grads_close(two["grads"], one["grads"], f"{centering} gradient")
        assert_grads_close(two["clipped"], one["clipped"], f"{centering} clipped gradient")
        check_update(two, centering)


# ----------------------------------------------------------------------------- --bf16 (dist_step: the bounds)

@pytest.fixture(scope="module")
def single_bf16(tmp_path_factory):
    return spawn(one_step, 1, tmp_path_factory.mktemp("single_bf16") / "one.pt", True)


@needs_native_bf16
def test_bf16_gradients_agree_with_float32(single, single_bf16):
    for centering, _ in CASES:
        assert_grads_within(single_bf16[centering]["grads"], single[centering]["grads"], BF16_VS_FLOAT32, centering)
        torch.testing.assert_close(single_bf16[centering]["loss"], single[centering]["loss"], rtol=BF16_VS_FLOAT32,
                                   atol=0)


@needs_native_bf16
def test_one_vs_two_processes_in_bf16(single_bf16, tmp_path):
    """Sinkhorn-Knopp under DDP, centering under FSDP2 (CASES), in bf16."""
    n = spawn(one_step, 2, tmp_path / "n.pt", True)
    for centering, _ in CASES:
        one, two = single_bf16[centering], n[centering]
        torch.testing.assert_close(two["loss"], one["loss"], rtol=BF16_ONE_VS_N, atol=0, msg=centering)
        assert_grads_within(two["grads"], one["grads"], BF16_ONE_VS_N, f"{centering} gradient")
        assert_grads_within(two["clipped"], one["clipped"], BF16_ONE_VS_N, f"{centering} clipped gradient")
        check_update(two, centering)
