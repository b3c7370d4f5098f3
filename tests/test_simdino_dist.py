"""SimDINO, 1 process vs 2 and 4 (gloo, CPU), DDP and FSDP2: the same global batch gives the same loss and
the same gradients before and after clipping; each run's update is AdamW's on its clipped gradients.

The coding rate couples the samples of a group, and groups never span processes, so the group size (2)
divides every per-process batch here.
"""
import pytest
import torch

import simdino
from dist_step import SPLIT_IDS, SPLITS, assert_grads_close, check_clipping_per_parameter, check_update, init, \
    record_step, share, spawn

GLOBAL_BATCH, GROUP = 8, 2
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--drop_path_rate", "0", "--cov_group_size", str(GROUP)]


def one_step(rank, world_size, fsdp, port, out):
    """Algorithm 1, one step, on this process's share of a fixed global batch."""
    init(rank, world_size, port)
    args = simdino.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size)] + (["--fsdp"] if fsdp else []))
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
    loss, _, _ = simdino.simdino_loss(zsg, zsl, ztg, args.eps, gamma, args.cov_group_size)
    result = record_step(simdino, student, teacher, loss, groups, world_size)
    if rank == 0:
        torch.save(result, out)
    if world_size > 1:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return spawn(one_step, 1, tmp_path_factory.mktemp("single") / "one.pt", False)


def test_one_process_step(single):
    check_clipping_per_parameter(single)
    check_update(single)
    assert "backbone.mask_token" not in single["grads"] and len(single["grads"]) > 100


@pytest.mark.parametrize("world_size, fsdp", SPLITS, ids=SPLIT_IDS)
def test_one_vs_n_processes(single, world_size, fsdp, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", fsdp)
    torch.testing.assert_close(n["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    assert_grads_close(n["grads"], single["grads"], "gradient")
    assert_grads_close(n["clipped"], single["clipped"], "clipped gradient")
    check_update(n)
