"""DINO, 1 process vs 2 and 4 (gloo, CPU), DDP and FSDP2: the centre is the global-batch mean, and a step is
the same however the global batch is split.

DINO couples the samples of a batch only through the centre, and the centre is updated with the mean
teacher score over the global batch (all-reduced), so the loss, the gradients before and after clipping,
and the new centre do not depend on the split; each run's update is AdamW's on its clipped gradients
(tests/dist_step.py says why the weights of two runs are not compared after Adam's step).
"""
import pytest
import torch
import torch.distributed as dist

import dino
from dist_step import BF16_VS_FLOAT32, SPLIT_IDS, SPLITS, assert_grads_close, assert_grads_within, autocast, \
    check_clipping_per_parameter, check_update, init, needs_native_bf16, record_step, share, spawn

GLOBAL_BATCH, K = 8, 16
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--out_dim", str(K), "--drop_path_rate", "0"]


def center_step(rank, world_size, port, out):
    init(rank, world_size, port)
    ztg = torch.randn(2, GLOBAL_BATCH, K, generator=torch.Generator().manual_seed(0))
    ztg[:, :GLOBAL_BATCH // 2] += 5.0                              # the two halves have different means
    center = torch.ones(1, K)
    dino.update_center(center, share(ztg, rank, world_size), 0.9)
    if rank == 0:
        torch.save(center, out)
    if world_size > 1:
        dist.destroy_process_group()


def one_step(rank, world_size, fsdp, bf16, port, out):
    """One DINO step on this process's share of a fixed global batch; bf16: as train() runs --bf16."""
    init(rank, world_size, port)
    args = dino.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size)] + (["--fsdp"] if fsdp else []))
    torch.manual_seed(0)
    student, teacher = dino.build_networks(args)
    model = dino.distribute(student, teacher, args, world_size, bf16)
    groups = dino.param_groups(student)             # before the forward, as in train(): FSDP2 swaps parameters
    g = torch.Generator().manual_seed(1)
    xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    center = 0.1 * torch.randn(1, K, generator=g)
    center_before = center.clone()
    xg, xl = share(xg, rank, world_size), share(xl, rank, world_size)

    with autocast(bf16):
        zsg, zsl = model(xg, xl)
        with torch.no_grad():
            ztg = teacher(xg)
        loss, _ = dino.dino_loss(zsg, zsl, ztg, center, args.student_temp, 0.04)
    dino.update_center(center, ztg, args.center_momentum)
    result = record_step(dino, student, teacher, loss, groups, world_size, center=center, center_before=center_before)
    if rank == 0:
        torch.save(result, out)
    if world_size > 1:
        dist.destroy_process_group()


def test_center_uses_the_global_batch_mean(tmp_path):
    single = spawn(center_step, 1, tmp_path / "c1.pt")
    double = spawn(center_step, 2, tmp_path / "c2.pt")
    torch.testing.assert_close(double, single, rtol=1e-6, atol=1e-6)
    ztg = torch.randn(2, GLOBAL_BATCH, K, generator=torch.Generator().manual_seed(0))
    ztg[:, :GLOBAL_BATCH // 2] += 5.0
    torch.testing.assert_close(single, 0.9 + 0.1 * ztg.mean((0, 1)).unsqueeze(0))
    local = 0.9 + 0.1 * ztg[:, :GLOBAL_BATCH // 2].mean((0, 1))    # rank 0's own half: what no all-reduce would give
    assert (double - local).abs().max() > 0.1


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return spawn(one_step, 1, tmp_path_factory.mktemp("single") / "s1.pt", False, False)


def test_one_process_step(single):
    check_clipping_per_parameter(single)
    check_update(single)
    assert "head.last_layer.weight_v" in single["grads"] and "head.last_layer.weight_g" not in single["grads"]
    assert not torch.allclose(single["center"], single["center_before"])


@pytest.mark.parametrize("world_size, fsdp", SPLITS, ids=SPLIT_IDS)
def test_one_vs_n_processes(single, world_size, fsdp, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", fsdp, False)
    torch.testing.assert_close(n["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n["center"], single["center"], rtol=1e-5, atol=1e-6)
    assert_grads_close(n["grads"], single["grads"], "gradient")
    assert_grads_close(n["clipped"], single["clipped"], "clipped gradient")
    check_update(n)


@needs_native_bf16
def test_bf16_gradients_agree_with_float32(single, tmp_path):
    """One step under --bf16 against the float32 one, each gradient within BF16_VS_FLOAT32 (dist_step) of it."""
    low = spawn(one_step, 1, tmp_path / "bf16.pt", False, True)
    assert_grads_within(low["grads"], single["grads"], BF16_VS_FLOAT32, "bf16 vs float32")
    torch.testing.assert_close(low["loss"], single["loss"], rtol=BF16_VS_FLOAT32, atol=0)
