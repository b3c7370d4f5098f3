"""What the 1-vs-N-process tests share: gloo process groups on the CPU, one training step recorded part by
part, and comparisons that hold on any CPU.

A step is recorded as the training loop runs it: the gradients after backward, the same after clipping
(active: CLIP is far below the gradients' norms), the weights before and after a fused AdamW step (the
optimiser of the GPU runs; on 4 processes FSDP2 leaves some ranks with empty shards of the (1, ...)
parameters), and the teacher after the EMA. N processes are compared with 1 on what must not depend on the
split of the batch (loss, gradients, clipped gradients); the update of each run is compared with the
plain one-process AdamW on that run's own clipped gradients. Adam's first step is sign-like, so comparing
the weights of two runs after it would see neither a wrong gradient scale nor pass reliably: tiny gradients
that differ in their last bits move their weights by different amounts.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import vit

LR, WD, MOMENTUM, CLIP = 1e-3, 0.04, 0.9, 0.01
SPLITS = [(2, False), (2, True), (4, False), (4, True)]          # (processes, FSDP2 instead of DDP)
SPLIT_IDS = ["2-ddp", "2-fsdp2", "4-ddp", "4-fsdp2"]
# the paths a GPU run takes under --bf16 (autocast, FSDP2's bf16 gathers) run on a CPU that computes bf16 natively
needs_native_bf16 = pytest.mark.skipif(not vit.bf16_native(torch.device("cpu")),
                                       reason="this CPU computes bf16 only by emulation (no AMX or AVX512-BF16): the "
                                              "--bf16 paths are tested on CPUs that compute bf16 natively")


def autocast(bf16):
    """The step's forward and loss as train() runs them under --bf16 (off: float32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


# bf16 keeps 8 significant bits: each rounding errs by up to U = 2^-8 relative (half its spacing 2^-7 at 1).
# A gradient through a 12-block ViT in bf16 carries many such roundings; measured on the tiny step of these
# tests, each tensor's gradient lies within 3-5 U of its float32 value (relative to the tensor's norm). Bound: 8 U.
# Two bf16 runs that round differently (another split of the batch: other kernel blockings, another order of the
# sums; FSDP2's bf16 gathers and bf16 unsharded gradients) are each within 8 U of the float32 gradient, so within
# 16 U of each other (measured: 1 U under DDP, 3-6 U under FSDP2). A wrong scale (a sum over processes instead of
# a mean, one shard clipped on its own) is off by 100 % or more.
U = 2.0 ** -8
BF16_VS_FLOAT32, BF16_ONE_VS_N = 8 * U, 16 * U


def assert_grads_within(actual, expected, bound, msg=""):
    """||actual - expected|| <= bound * ||expected||, tensor by tensor (a relative bound on each tensor's norm)."""
    assert actual.keys() == expected.keys(), msg
    for n, v in expected.items():
        err = (actual[n].double() - v.double()).norm() / v.double().norm().clamp(min=1e-30)
        assert err <= bound, f"{msg} {n}: relative error {err:.3g} > {bound:.3g}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank, world_size, port):
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)


def share(x, rank, world_size):
    """This process's part of a tensor whose dim 1 is the global batch: (M, B, ...) -> (M, B / world_size, ...)."""
    b = x.shape[1] // world_size
    return x[:, rank * b:(rank + 1) * b]


def full_state(model):
    """Full tensors, copied (on one process the state dict holds the parameters themselves)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in sd.items()}


def full_grads(model):
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def record_step(method, student, teacher, loss, groups, world_size, **extra):
    """backward, clipping, fused AdamW and EMA as train() runs them, each recorded (full tensors)."""
    loss.backward()
    grads = full_grads(student)
    method.clip_gradients(student, CLIP)
    clipped = full_grads(student)
    before = full_state(student)
    optimizer = torch.optim.AdamW(groups, lr=LR, fused=True)
    names = {id(p): n for n, p in student.named_parameters()}
    hyper = {}
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = LR * g["lr_mult"], WD * g["wd_mult"]
        hyper.update({names[id(p)]: (g["lr"], g["weight_decay"]) for p in g["params"]})
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - MOMENTUM)
    loss = loss.detach()
    if world_size > 1:
        dist.all_reduce(loss)
        loss /= world_size
    return {"loss": loss, "grads": grads, "clipped": clipped, "before": before, "after": full_state(student),
            "teacher": full_state(teacher), "hyper": hyper, **extra}


def spawn(fn, world_size, out, *args):
    """fn(rank, world_size, *args, port, out) on world_size processes (or in this one); rank 0's file."""
    if world_size == 1:
        fn(0, 1, *args, None, out)
    else:
        mp.start_processes(fn, args=(world_size, *args, free_port(), out), nprocs=world_size, start_method="fork")
    return torch.load(out)


def assert_grads_close(actual, expected, msg=""):
    """Sums over the batch taken in another order differ by about 1e-7 of a tensor's largest entry: allow 1e-5
    of it, and 1e-4 relative. A wrong scale (a sum instead of a mean over processes, one shard clipped on its
    own) is off by far more."""
    assert actual.keys() == expected.keys(), msg
    for n, v in expected.items():
        torch.testing.assert_close(actual[n], v, rtol=1e-4, atol=1e-5 * v.abs().max().item() + 1e-12,
                                   msg=f"{msg} {n}")


def check_update(r, msg=""):
    """The recorded update is AdamW's on the recorded clipped gradients (here the plain for-loop AdamW on
    full tensors), parameters without a gradient did not move, and the teacher is the EMA of the student."""
    moved = 0
    for n, w in r["before"].items():
        if n not in r["clipped"]:
            torch.testing.assert_close(r["after"][n], w, rtol=0, atol=0, msg=f"{msg} {n} has no gradient")
        else:
            lr, wd = r["hyper"][n]
            p = w.clone().requires_grad_()
            p.grad = r["clipped"][n].clone()
            torch.optim.AdamW([p], lr=lr, weight_decay=wd, foreach=False).step()
            torch.testing.assert_close(r["after"][n], p.detach(), rtol=1e-6, atol=1e-8, msg=f"{msg} {n}")
            moved += not torch.equal(r["after"][n], w)
        torch.testing.assert_close(r["teacher"][n], torch.lerp(w, r["after"][n], 1 - MOMENTUM), rtol=1e-6,
                                   atol=1e-8, msg=f"{msg} teacher {n}")
    assert moved > 100, msg                                       # the step did change the weights


def check_clipping_per_parameter(r):
    """DINO's clipping was active and per parameter: each clipped gradient has norm min(its norm, CLIP)."""
    assert sum(g.norm() > 2 * CLIP for g in r["grads"].values()) > 50
    for n, g in r["grads"].items():
        expected = g * min(1.0, CLIP / (g.norm().item() + 1e-6))
        torch.testing.assert_close(r["clipped"][n], expected, rtol=1e-5, atol=1e-5 * CLIP, msg=n)


def check_clipping_per_part(r, prefixes):
    """DINOv2's clipping was active and per part (backbone, each head): each part's gradients, as one vector,
    were scaled to norm min(its norm, CLIP)."""
    assert set(r["grads"]) == {n for n in r["grads"] if n.startswith(tuple(prefixes))}
    for prefix in prefixes:
        part = {n: g for n, g in r["grads"].items() if n.startswith(prefix)}
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in part.values()])).item()
        assert norm > 2 * CLIP, prefix
        for n, g in part.items():
            torch.testing.assert_close(r["clipped"][n], g * CLIP / (norm + 1e-6), rtol=1e-5, atol=1e-7 * CLIP, msg=n)
