"""1 process vs 2 (gloo, CPU): the centre is the global-batch mean, and a step is the same on 1 or 2 processes.

DINO couples the samples of a batch only through the centre, and the centre is updated with the
mean teacher score over the global batch (all-reduced), so the loss, the gradients, the update
and the new centre do not depend on how the global batch is split over processes.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import dino
from test_simdino_dist import free_port

GLOBAL_BATCH, K = 8, 16
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--out_dim", str(K), "--drop_path_rate", "0"]


def setup(rank, world_size, port):
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    return slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)


def center_step(rank, world_size, port, out):
    share = setup(rank, world_size, port)
    ztg = torch.randn(2, GLOBAL_BATCH, K, generator=torch.Generator().manual_seed(0))
    ztg[:, :GLOBAL_BATCH // 2] += 5.0                              # the two halves have different means
    center = torch.ones(1, K)
    dino.update_center(center, ztg[:, share], 0.9)
    if rank == 0:
        torch.save(center, out)
    if world_size > 1:
        dist.destroy_process_group()


def one_step(rank, world_size, fsdp, port, out):
    """One DINO step on this process's share of a fixed global batch."""
    share = setup(rank, world_size, port)
    args = dino.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size)] + (["--fsdp"] if fsdp else []))
    torch.manual_seed(0)
    student, teacher = dino.build_networks(args)
    model = dino.distribute(student, teacher, args, world_size)
    optimizer = torch.optim.AdamW(dino.param_groups(student), lr=1e-3, weight_decay=0.04)
    g = torch.Generator().manual_seed(1)
    xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    center = 0.1 * torch.randn(1, K, generator=g)
    center_before = center.clone()
    xg, xl = xg[:, share], xl[:, share]

    zsg, zsl = model(xg, xl)
    with torch.no_grad():
        ztg = teacher(xg)
    loss, _ = dino.dino_loss(zsg, zsl, ztg, center, args.student_temp, 0.04)
    loss.backward()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in student.named_parameters() if p.grad is not None}
    dino.clip_gradients(student, 0.01)          # small enough to clip most parameters
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - 0.9)
    dino.update_center(center, ztg, args.center_momentum)
    loss = loss.detach()
    if world_size > 1:
        dist.all_reduce(loss)
        loss /= world_size
    result = {"loss": loss, "grads": grads, "center": center, "center_before": center_before, "student": get_model_state_dict(student, options=full),
              "teacher": get_model_state_dict(teacher, options=full)}
    if rank == 0:
        torch.save(result, out)
    if world_size > 1:
        dist.destroy_process_group()


def spawn(fn, world_size, out, *args):
    if world_size == 1:
        fn(0, 1, *args, None, out)
    else:
        mp.start_processes(fn, args=(world_size, *args, free_port(), out), nprocs=world_size, start_method="fork")
    return torch.load(out)


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
    return spawn(one_step, 1, tmp_path_factory.mktemp("single") / "s1.pt", False)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_one_vs_two_processes(single, fsdp, tmp_path):
    double = spawn(one_step, 2, tmp_path / "s2.pt", fsdp)
    torch.testing.assert_close(double["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(double["center"], single["center"], rtol=1e-5, atol=1e-6)
    assert single["grads"].keys() == double["grads"].keys() and len(single["grads"]) > 100
    assert "head.last_layer.weight_v" in single["grads"] and "head.last_layer.weight_g" not in single["grads"]
    for n in single["grads"]:
        torch.testing.assert_close(double["grads"][n], single["grads"][n], rtol=1e-4, atol=1e-7, msg=n)
    for part in ("student", "teacher"):
        for n, v in single[part].items():
            torch.testing.assert_close(double[part][n], v, rtol=1e-4, atol=1e-6, msg=f"{part} {n}")
    # the step did change the weights and the centre (so the equality above is not vacuous)
    torch.manual_seed(0)
    fresh, _ = dino.build_networks(dino.get_args(TINY))
    for n in ("backbone.blocks.0.attn.qkv.weight", "head.last_layer.weight_v"):
        assert not torch.allclose(fresh.state_dict()[n], single["student"][n])
    assert not torch.allclose(single["center"], single["center_before"])
