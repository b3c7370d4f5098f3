"""SimDINO, 1 process vs 2 and 4 (gloo, CPU), DDP and FSDP2: the same global batch gives the same loss and
the same gradients before and after clipping; each run's update is AdamW's on its clipped gradients.

The coding rate couples the samples of a group. Groups of 2 fit in every per-process batch here; groups
of 4 or 8 span 2 or 4 processes, whose covariances are summed by a differentiable all-reduce on their
subgroup, and then too the loss, the gradients and the update equal those of one process.
"""
import pytest
import torch

import simdino
from dist_step import SPLIT_IDS, SPLITS, assert_grads_close, check_clipping_per_parameter, check_update, init, \
    record_step, share, spawn

GLOBAL_BATCH = 8
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--drop_path_rate", "0"]


def one_step(rank, world_size, fsdp, group_size, port, out):
    """Algorithm 1, one step, on this process's share of a fixed global batch."""
    init(rank, world_size, port)
    args = simdino.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size), "--cov_group_size",
                                    str(group_size)] + (["--fsdp"] if fsdp else []))
    cov_group = simdino.coding_rate_group(args.cov_group_size, args.batch_size_per_gpu)
    torch.manual_seed(0)
    student, teacher = simdino.build_networks(args)
    model = simdino.distribute(student, teacher, args, world_size)
    groups = simdino.param_groups(student)          # before the forward, as in train(): FSDP2 swaps parameters
    g = torch.Generator().manual_seed(1)
    xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    xg, xl = share(xg, rank, world_size), share(xl, rank, world_size)

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
    return {n: spawn(one_step, 1, folder / f"{n}.pt", False, n) for n in (2, 4, 8)}


def test_one_process_step(single):
    check_clipping_per_parameter(single[2])
    check_update(single[2])
    assert "backbone.mask_token" not in single[2]["grads"] and len(single[2]["grads"]) > 100
    assert abs(single[8]["loss"] - single[2]["loss"]) > 1e-3                  # the group size matters


@pytest.mark.parametrize("world_size, fsdp", SPLITS, ids=SPLIT_IDS)
def test_one_vs_n_processes(single, world_size, fsdp, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", fsdp, 2)
    torch.testing.assert_close(n["loss"], single[2]["loss"], rtol=1e-5, atol=1e-6)
    assert_grads_close(n["grads"], single[2]["grads"], "gradient")
    assert_grads_close(n["clipped"], single[2]["clipped"], "clipped gradient")
    check_update(n)


@pytest.mark.parametrize("world_size, fsdp, group_size", [(2, False, 8), (4, True, 8), (4, False, 4)],
                         ids=["2-ddp-8", "4-fsdp2-8", "4-ddp-4"])
def test_groups_spanning_processes_equal_one_process(single, world_size, fsdp, group_size, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", fsdp, group_size)
    torch.testing.assert_close(n["loss"], single[group_size]["loss"], rtol=1e-5, atol=1e-6)
    assert_grads_close(n["grads"], single[group_size]["grads"], "gradient")
    assert_grads_close(n["clipped"], single[group_size]["clipped"], "clipped gradient")
    check_update(n)
