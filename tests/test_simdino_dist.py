"""SimDINO, 1 process vs 2 and 4 (gloo, CPU), DDP and FSDP2: the same global batch gives the same loss and
the same gradients before and after clipping; each run's update is AdamW's on its clipped gradients.

The coding rate couples the samples of a group. Groups of 2 fit in every per-process batch here; groups
of 4 or 8 span 2 or 4 processes, whose covariances are summed by a differentiable all-reduce on their
subgroup, and then too the loss, the gradients and the update equal those of one process.
"""
import pytest
import torch

import simdino
from dist_step import BF16_ONE_VS_N, BF16_VS_FLOAT32, SPLIT_IDS, SPLITS, assert_grads_close, assert_grads_within, \
    autocast, check_clipping_per_parameter, check_update, init, needs_native_bf16, record_step, share, spawn

GLOBAL_BATCH = 8
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--drop_path_rate", "0"]


def one_step(rank, world_size, fsdp, group_size, bf16, port, out):
    """Algorithm 1, one step, on this process's share of a fixed global batch; bf16: as train() runs --bf16."""
    init(rank, world_size, port)
    args = simdino.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size), "--cov_group_size",
                                    str(group_size)] + (["--fsdp"] if fsdp else []))
    cov_group = simdino.coding_rate_group(args.cov_group_size, args.batch_size_per_gpu)
    torch.manual_seed(0)
    student, teacher = simdino.build_networks(args)
    model = simdino.distribute(student, teacher, args, world_size, bf16)
    groups = simdino.param_groups(student)          # before the forward, as in train(): FSDP2 swaps parameters
    g = torch.Generator().manual_seed(1)
    xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    xg, xl = share(xg, rank, world_size), share(xl, rank, world_size)

    with autocast(bf16):
        zsg, zsl = model(xg, xl)
        with torch.no_grad():
            ztg = teacher(xg)
        gamma = simdino.released_gamma(args.proj_dim, GLOBAL_BATCH)
        loss, _, _ = simdino.simdino_loss(zsg, zsl, ztg, args.eps, gamma, args.cov_group_size, cov_group=cov_group)
    result = record_step(simdino, student, teacher, loss, groups, world_size)
    if rank == 0:
        torch.save(result, out)
    if world_size > 1:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process step, by group size."""
    folder = tmp_path_factory.mktemp("single")
    return {n: spawn(one_step, 1, folder / f"{n}.pt", False, n, False) for n in (2, 4, 8)}


def test_one_process_step(single):
    check_clipping_per_parameter(single[2])
    check_update(single[2])
    assert "backbone.mask_token" not in single[2]["grads"] and len(single[2]["grads"]) > 100
    assert abs(single[8]["loss"] - single[2]["loss"]) > 1e-3                  # the group size matters


@pytest.mark.parametrize("world_size, fsdp", SPLITS, ids=SPLIT_IDS)
def test_one_vs_n_processes(single, world_size, fsdp, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", fsdp, 2, False)
    torch.testing.assert_close(n["loss"], single[2]["loss"], rtol=1e-5, atol=1e-6)
    assert_grads_close(n["grads"], single[2]["grads"], "gradient")
    assert_grads_close(n["clipped"], single[2]["clipped"], "clipped gradient")
    check_update(n)


@pytest.mark.parametrize("world_size, fsdp, group_size", [(2, False, 8), (4, True, 8), (4, False, 4)],
                         ids=["2-ddp-8", "4-fsdp2-8", "4-ddp-4"])
def test_groups_spanning_processes_equal_one_process(single, world_size, fsdp, group_size, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", fsdp, group_size, False)
    torch.testing.assert_close(n["loss"], single[group_size]["loss"], rtol=1e-5, atol=1e-6)
    assert_grads_close(n["grads"], single[group_size]["grads"], "gradient")
    assert_grads_close(n["clipped"], single[group_size]["clipped"], "clipped gradient")
    check_update(n)


# ----------------------------------------------------------------------------- --bf16 (dist_step: the bounds)

@pytest.fixture(scope="module")
def single_bf16(tmp_path_factory):
    return spawn(one_step, 1, tmp_path_factory.mktemp("single_bf16") / "1.pt", False, 2, True)


@needs_native_bf16
def test_bf16_gradients_agree_with_float32(single, single_bf16):
    assert_grads_within(single_bf16["grads"], single[2]["grads"], BF16_VS_FLOAT32, "bf16 vs float32")
    torch.testing.assert_close(single_bf16["loss"], single[2]["loss"], rtol=BF16_VS_FLOAT32, atol=0)


@needs_native_bf16
@pytest.mark.parametrize("fsdp", [False, True], ids=["2-ddp", "2-fsdp2"])
def test_one_vs_two_processes_in_bf16(single_bf16, fsdp, tmp_path):
    n = spawn(one_step, 2, tmp_path / "n.pt", fsdp, 2, True)
    torch.testing.assert_close(n["loss"], single_bf16["loss"], rtol=BF16_ONE_VS_N, atol=0)
    assert_grads_within(n["grads"], single_bf16["grads"], BF16_ONE_VS_N, "gradient")
    assert_grads_within(n["clipped"], single_bf16["clipped"], BF16_ONE_VS_N, "clipped gradient")
    check_update(n)
