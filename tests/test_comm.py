"""What one training step communicates, counted by `bench.py --comm` (CommDebugMode) on 2 gloo processes.

FSDP2: each block is gathered once in forward and once in backward (the student) or once (the teacher),
each root once, a float32 unit (DINO's prototype layer) once per network; one reduce-scatter per student
unit; one all-reduce for the clipping, plus the method's own statistics (STATISTICS). The bytes are those
of the parameters, padded as FSDP2 pads them (dim 0 to a multiple of the world size), gathered in bf16
under --bf16 and reduced in float32, plus a few KB of norms and statistics.
DDP: the gradient buckets' all-reduces, every trained parameter's gradient once, and no broadcast.
"""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import bench
import dino
import dinov2
import simdino
import simdinov2
from dist_step import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"simdino": simdino, "dino": dino, "simdinov2": simdinov2, "dinov2": dinov2}
SMALL = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
         "--local_crops_number", "2", "--batch_size_per_gpu", "2", "--num_workers", "0", "--proj_hidden_dim", "64",
         "--proj_dim", "16"]
# all-reduces of a step besides the clipping's: DINO's centre; DINOv2's Sinkhorn-Knopp, for the CLS tokens and
# for the masked patches, each: the best score per prototype (max), the sample count with the total mass, and
# one per iteration (3) for the prototypes' mass
STATISTICS = {"simdino": 0, "simdinov2": 0, "dino": 1, "dinov2": 2 * (1 + 1 + 3)}
OWN = {"simdino": ["--cov_group_size", "2"], "simdinov2": ["--cov_group_size", "2"],
       "dino": ["--out_dim", "64"], "dinov2": ["--out_dim", "64", "--ibot_out_dim", "64"]}


def comm_worker(rank, world_size, method, flags, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _, counter = bench.measure_comm(method, SMALL + OWN[method] + flags)
    if rank == 0:
        torch.save(bench.comm_summary(counter), out)


def comm(method, flags, tmp_path, world_size=2):
    """bench.py --comm's count, in processes forked from this one (a torchrun of its own is tested once)."""
    out = tmp_path / f"{method}.pt"
    mp.start_processes(comm_worker, args=(world_size, method, flags, free_port(), out), nprocs=world_size,
                       start_method="fork")
    return torch.load(out)


def test_command_line_prints_the_count(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "bench.py", "simdino", "--comm", *SMALL, *OWN["simdino"], "--fsdp"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("collectives per step (rank 0): "), proc.stdout[-2000:]
    printed = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", last)}
    assert printed == comm("simdino", ["--fsdp"], tmp_path)
    assert "allgather: 38 calls" in proc.stdout and "FSDP2, bf16 parameters" in proc.stdout


def padded(p, world_size):
    return math.ceil(p.shape[0] / world_size) * world_size * p[0].numel() if p.ndim else world_size


def expected_fsdp2(method, bf16, world_size=2):
    args = METHODS[method].get_args(SMALL + OWN[method])
    student, _ = METHODS[method].build_networks(args)
    f32 = {id(p) for m in student.modules() if getattr(m, "float32_params", False) for p in m.parameters()}
    blocks = {id(p) for p in student.backbone.blocks.parameters()}
    low = 2 if bf16 else 4
    gathered = sum(padded(p, world_size) * (4 if id(p) in f32 else low) * (3 if id(p) in blocks else 2)
                   for p in student.parameters())                   # blocks: student twice, teacher once
    reduced = sum(4 * padded(p, world_size) for p in student.parameters() if p.requires_grad)
    depth, float32_units = len(student.backbone.blocks), 1 if f32 else 0
    return {"all_gather": 3 * depth + 2 + 2 * float32_units, "reduce_scatter": depth + 1 + float32_units,
            "all_reduce": 1 + STATISTICS[method], "broadcast": 0}, gathered + reduced


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_step_gathers_each_unit_once_per_pass(method, tmp_path):
    counts, nbytes = expected_fsdp2(method, bf16=True)
    measured = comm(method, ["--fsdp", "--bf16"], tmp_path)
    assert {k: measured[k] for k in counts} == counts
    assert 0 < measured["bytes"] - nbytes < 2**16                      # + the norms and statistics all-reduced


def test_fsdp2_without_bf16_gathers_float32(tmp_path):
    counts, nbytes = expected_fsdp2("simdino", bf16=False)
    measured = comm("simdino", ["--fsdp", "--no-bf16"], tmp_path)
    assert {k: measured[k] for k in counts} == counts and 0 < measured["bytes"] - nbytes < 2**16


@pytest.mark.parametrize("method", ["simdino", "dino"])
def test_ddp_step_all_reduces_each_gradient_once_and_broadcasts_nothing(method, tmp_path):
    args = METHODS[method].get_args(SMALL + OWN[method])
    student, _ = METHODS[method].build_networks(args)
    measured = comm(method, [], tmp_path)
    assert measured["broadcast"] == 0 and measured["all_gather"] == 0 and measured["reduce_scatter"] == 0
    gradients = 4 * sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert 0 <= measured["bytes"] - gradients < 2**16                  # + DINO's centre
    assert measured["all_reduce"] == 2 + STATISTICS[method]            # buckets of 1 MiB, then 25 MiB: 2 for 22 MB
