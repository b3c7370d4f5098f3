"""1 process vs 2 (gloo, CPU): the same global batch gives the same loss, gradients and update."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import simdino

GLOBAL_BATCH, GROUP = 8, 4
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--drop_path_rate", "0", "--cov_group_size", str(GROUP)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_step(rank, world_size, fsdp, port, out):
    """Algorithm 1, one step, on this process's share of a fixed global batch."""
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    args = simdino.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size)] + (["--fsdp"] if fsdp else []))
    torch.manual_seed(0)
    student, teacher = simdino.build_networks(args)
    model = simdino.distribute(student, teacher, args, world_size)
    optimizer = torch.optim.AdamW(simdino.param_groups(student), lr=1e-3, weight_decay=0.04)
    g = torch.Generator().manual_seed(1)
    xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    share = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    xg, xl = xg[:, share], xl[:, share]

    zsg, zsl = model(xg, xl)
    with torch.no_grad():
        ztg = teacher(xg)
    gamma = simdino.released_gamma(args.proj_dim, GLOBAL_BATCH)
    loss, _, _ = simdino.simdino_loss(zsg, zsl, ztg, args.eps, gamma, args.cov_group_size)
    loss.backward()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in student.named_parameters() if p.grad is not None}
    simdino.clip_gradients(student, 0.01)          # small enough to clip most parameters
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - 0.9)
    loss = loss.detach()
    if world_size > 1:
        dist.all_reduce(loss)
        loss /= world_size
    result = {"loss": loss, "grads": grads, "student": get_model_state_dict(student, options=full),
              "teacher": get_model_state_dict(teacher, options=full)}
    if rank == 0:
        torch.save(result, out)
    if world_size > 1:
        dist.destroy_process_group()


def run(world_size, fsdp, tmp_path):
    out = tmp_path / f"step_{world_size}_{fsdp}.pt"
    if world_size == 1:
        one_step(0, 1, fsdp, None, out)
    else:
        mp.start_processes(one_step, args=(world_size, fsdp, free_port(), out), nprocs=world_size, start_method="fork")
    return torch.load(out)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_one_vs_two_processes(fsdp, tmp_path):
    single, double = run(1, False, tmp_path), run(2, fsdp, tmp_path)
    torch.testing.assert_close(double["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    assert single["grads"].keys() == double["grads"].keys() and len(single["grads"]) > 100
    for n in single["grads"]:
        torch.testing.assert_close(double["grads"][n], single["grads"][n], rtol=1e-4, atol=1e-7, msg=n)
    for part in ("student", "teacher"):
        for n, v in single[part].items():
            torch.testing.assert_close(double[part][n], v, rtol=1e-4, atol=1e-6, msg=f"{part} {n}")
    # the step did change the weights (so the equality above is not vacuous)
    torch.manual_seed(0)
    fresh, _ = simdino.build_networks(simdino.get_args(TINY))
    assert not torch.allclose(fresh.state_dict()["backbone.blocks.0.attn.qkv.weight"],
                              single["student"]["backbone.blocks.0.attn.qkv.weight"])
