"""--bf16 as a GPU run takes it, run on the CPU: each method's train() for a few steps on 1 process and on 2
(gloo) under DDP and under FSDP2, with the dtypes recorded where they matter, and a resumed run that is bit-exact.

What is recorded, by patching the functions train() calls (in each process):
  - every block's call: autocast on, the dtype of its qkv weight as the block sees it (FSDP2: the gathered
    parameter, bf16; otherwise the float32 parameter, which autocast casts inside the matmul), of the attention
    and MLP branches' outputs (bf16: the matmuls run in bf16) and of its output (the residual stream, float32:
    under autocast the stream stays float32 and FSDP2 does not cast it, as under DDP);
  - the attention formulation: the explicit one (vit.explicit_attention) on a CPU in bf16;
  - the heads' outputs (the losses' inputs: normalised features, prototype scores) float32;
  - the loss (what backward is called on): float32, finite;
  - the coding rate's Cholesky factorisation (SimDINO, SimDINOv2): float64 input;
  - DINO's and DINOv2's prototype scores (the WeightNormLinear layers): float32 output from float32 weights;
  - after each optimiser step: parameters, gradients (FSDP2: the reduced shards, DTensors) and AdamW's state float32.
Then the step's float32 tail (heads' normalisation and prototypes, the losses) under bf16 autocast against float64.
Skipped, with the reason, on a CPU without native bf16, where --bf16 falls back to float32.
"""
import collections
import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

import dino
import dinov2
import simdino
import simdinov2
import vit
from dist_step import free_port, needs_native_bf16

pytestmark = needs_native_bf16
METHODS = {"simdino": simdino, "dino": dino, "simdinov2": simdinov2, "dinov2": dinov2}
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--local_crops_number", "2", "--proj_hidden_dim", "32", "--proj_dim", "16", "--data", "synthetic:8",
        "--batch_size_per_gpu", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
        "--log_every", "1", "--saveckp_freq", "1", "--lr", "0.01"]
OWN = {"simdino": ["--cov_group_size", "2"], "simdinov2": ["--cov_group_size", "2"],
       "dino": ["--out_dim", "32", "--freeze_last_layer", "0"],
       "dinov2": ["--out_dim", "32", "--freeze_last_layer", "0"]}


def record_dtypes(method, seen):
    """Patch what train() calls so that each call adds what it sees to `seen` (name -> set of values)."""
    def add(name, value):
        seen[name].add(str(value).replace("torch.", ""))

    residual = vit.Block.residual_branches

    def block(self, x):
        add("autocast", torch.is_autocast_enabled("cpu"))
        add("block weight", self.attn.qkv.weight.dtype)
        add("attention branch", self.attn(self.norm1(x)).dtype)
        add("mlp branch", self.mlp(self.norm2(x)).dtype)
        out = residual(self, x)
        add("block output", out.dtype)
        return out
    vit.Block.residual_branches = block

    explicit = vit.explicit_attention
    vit.explicit_attention = lambda q, k, v: add("explicit attention", q.dtype) or explicit(q, k, v)

    backward = torch.Tensor.backward

    def loss_backward(self, *args, **kwargs):
        add("loss", self.dtype)
        add("loss finite", bool(torch.isfinite(self)))
        return backward(self, *args, **kwargs)
    torch.Tensor.backward = loss_backward

    cholesky = torch.linalg.cholesky_ex
    torch.linalg.cholesky_ex = lambda A, *a, **k: add("cholesky", A.dtype) or cholesky(A, *a, **k)

    head = getattr(method, "Projector", None) or method.DINOHead
    head_forward = head.forward
    head.forward = lambda self, x: (lambda out: add("head output", out.dtype) or out)(head_forward(self, x))

    if hasattr(method, "WeightNormLinear"):
        forward = method.WeightNormLinear.forward

        def scores(self, x):
            out = forward(self, x)
            add("prototype weights", self.weight_v.dtype)
            add("prototype scores", out.dtype)
            return out
        method.WeightNormLinear.forward = scores

    def after_step(optimizer, *_):
        for group in optimizer.param_groups:
            for p in group["params"]:
                add("parameter", type(p).__name__ + " " + str(p.dtype))
                if p.grad is not None:
                    add("gradient", type(p.grad).__name__ + " " + str(p.grad.dtype))
                for v in optimizer.state[p].values():
                    if torch.is_tensor(v) and v.numel() > 1:
                        add("optimizer state", v.dtype)
    register_optimizer_step_post_hook(after_step)


def run(rank, world_size, name, argv, port, folder):
    """train() on this process as torchrun would start it, the dtypes recorded into folder/seen<rank>.json."""
    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = collections.defaultdict(set)
    record_dtypes(METHODS[name], seen)
    METHODS[name].train(METHODS[name].get_args(argv))
    with open(os.path.join(folder, f"seen{rank}.json"), "w") as f:
        json.dump({k: sorted(v) for k, v in seen.items()}, f)


def train(name, world_size, argv, folder):
    """{rank: what it saw}, train() run in world_size fresh processes (forked: the patches stay in them)."""
    mp.start_processes(run, args=(world_size, name, argv, free_port(), str(folder)), nprocs=world_size,
                       start_method="fork")
    seen = {}
    for rank in range(world_size):
        with open(os.path.join(folder, f"seen{rank}.json")) as f:
            seen[rank] = {k: set(v) for k, v in json.load(f).items()}
    return seen


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_dtypes(name, seen, fsdp):
    weight = "bfloat16" if fsdp else "float32"                      # FSDP2 gathers bf16; DDP keeps float32
    expected = {"autocast": {"True"}, "block weight": {weight}, "attention branch": {"bfloat16"},
                "mlp branch": {"bfloat16"}, "block output": {"float32"}, "explicit attention": {"bfloat16"},
                "head output": {"float32"}, "loss": {"float32"}, "loss finite": {"True"},
                "optimizer state": {"float32"},
                "parameter": {"DTensor float32" if fsdp else "Parameter float32"},
                "gradient": {"DTensor float32" if fsdp else "Tensor float32"}}
    if name.startswith("sim"):
        expected["cholesky"] = {"float64"}
    else:
        expected.update({"prototype weights": {"float32"}, "prototype scores": {"float32"}})
    assert seen == expected


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each method on 1 process, with its checkpoint after epoch 1 resumed to the end (bit-exact)."""
    out = {}
    for name in METHODS:
        folder = tmp_path_factory.mktemp(name)
        argv = TINY + OWN[name]
        seen = train(name, 1, argv + ["--output_dir", str(folder / "a")], folder)
        train(name, 1, argv + ["--output_dir", str(folder / "b"), "--resume", str(folder / "a" / "checkpoint0001.pth")],
              folder)
        out[name] = folder, seen[0]
    return out


@pytest.mark.parametrize("name", METHODS)
def test_one_process_trains_in_bf16_with_the_dtypes_of_a_gpu_run(name, runs, capfd):
    folder, seen = runs[name]
    check_dtypes(name, seen, fsdp=False)
    log = read_log(folder / "a")
    assert [r["iteration"] for r in log] == [0, 1, 2, 3] and all(r["loss"] == r["loss"] for r in log)


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_exact_under_bf16(name, runs):
    """Batches, views, drop path and the bf16 arithmetic depend on the iteration alone: the run resumed after
    epoch 1 ends with the very weights, optimiser state and log of the uninterrupted one."""
    folder, _ = runs[name]
    a, b = (torch.load(folder / run / "checkpoint.pth", weights_only=True) for run in "ab")
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert [r["loss"] for r in read_log(folder / "b")] == [r["loss"] for r in read_log(folder / "a")[2:]]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_train_in_bf16_with_the_dtypes_of_a_gpu_run(name, fsdp, tmp_path, capfd):
    argv = TINY + OWN[name] + ["--output_dir", str(tmp_path / "run"), "--data", "synthetic:16", "--epochs", "1"]
    argv += ["--fsdp"] if fsdp else []
    seen = train(name, 2, argv, tmp_path)
    for rank in (0, 1):
        check_dtypes(name, seen[rank], fsdp)
    out = capfd.readouterr().out
    assert "2 process(es)" in out and "precision bf16 autocast" in out
    log = read_log(tmp_path / "run")
    assert [r["iteration"] for r in log] == [0, 1] and all(r["loss"] == r["loss"] for r in log)


# ----------------------------------------------------------------------------- the float32 tail of the step

def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def prototype_heads(method, n):
    """n of the method's heads with the identity for MLP: what is left is the float32 part, normalisation and
    prototypes."""
    heads = nn.ModuleList(method.DINOHead(16, 32, 16, 24) for _ in range(n))
    for h in heads:
        h.mlp = nn.Identity()
    return heads


def tails():
    """Per method: (module, the step's part after the backbone's and heads' bf16 matmuls as a function of module and
    float32 features, the features). The backbone in bf16 has gradients within a few bf16 units of the float32 ones
    (tests/dist_step.py), which hides a loss computed in bf16 (measured: SimDINO's one-step gradients within 0.0138
    of float32 with the loss in float32, 0.0140 with it in bf16). So this part is checked on its own."""
    B, eps = 16, 0.4 ** 0.5
    m = torch.rand(2 * B, 4, generator=torch.Generator().manual_seed(0)) < 0.4              # (M_glo*B, N) masks
    w, n = simdinov2.patch_weights(m), int(m.sum())
    center, patch_center = 0.1 * unit(1, 24, seed=9), 0.1 * unit(1, 24, seed=10)

    def simdino_tail(_, zsg, zsl, ztg):
        return simdino.simdino_loss(zsg, zsl, ztg, eps, simdino.released_gamma(16, B), 8)[0]

    def simdinov2_tail(_, zsg, zsl, ztg, Zsg, Ztg):
        return simdinov2.simdinov2_loss(zsg, zsl, ztg, Zsg, Ztg, w.to(zsg.dtype), eps,
                                        simdinov2.released_gamma(16, B), 8)[0]

    def dino_tail(heads, ysg, ysl, ytg):
        with torch.no_grad():
            ztg = heads[0](ytg)
        return dino.dino_loss(heads[0](ysg), heads[0](ysl), ztg, center.to(ytg.dtype), 0.1, 0.04)[0]

    def dinov2_tail(heads, ysg, ysl, Ysg, ytg, Ytg, xsg):
        with torch.no_grad():
            pt, Pt = dinov2.teacher_targets(heads[0](ytg), heads[1](Ytg), 0.05, "sinkhorn_knopp", center,
                                            patch_center, 0.9)
        return dinov2.dinov2_loss(heads[0](ysg), heads[0](ysl), pt, heads[1](Ysg), Pt, w.to(ysg.dtype), xsg, 0.1)[0]

    views = [unit(2, B, 16, seed=1), unit(3, B, 16, seed=2), unit(2, B, 16, seed=3)]         # zsg, zsl, ztg
    patches = [unit(n, 16, seed=4), unit(n, 16, seed=5)]                                      # Zsg, Ztg
    return {"simdino": (nn.Module(), simdino_tail, views),
            "simdinov2": (nn.Module(), simdinov2_tail, views + patches),
            "dino": (prototype_heads(dino, 1), dino_tail, [4 * x for x in views]),
            "dinov2": (prototype_heads(dinov2, 2), dinov2_tail, [4 * x for x in views[:2] + patches[:1] + views[2:] +
                                                         patches[1:]] + [unit(2, B, 32, seed=6)])}


def tail_gradients(module, tail, inputs, bf16):
    """(loss, gradients w.r.t. the inputs and the module's parameters): float32 inputs under bf16 autocast, as
    train() runs --bf16, or everything in float64."""
    module = copy.deepcopy(module) if bf16 else copy.deepcopy(module).double()
    xs = [x.clone().requires_grad_() if bf16 else x.double().requires_grad_() for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = tail(module, *xs)
    loss.backward()
    return loss, [t.grad for t in xs + list(module.parameters()) if t.grad is not None]


@pytest.mark.parametrize("name", METHODS)
def test_the_losses_and_prototypes_stay_float32_under_bf16_autocast(name):
    """The step after the bf16 matmuls (DINO's and DINOv2's prototype layers, every loss term, the coding rate)
    gives, under bf16 autocast, the gradients float64 gives to 2^-12 of each tensor's norm: float32 arithmetic
    errs by about 1e-6 here, bf16 arithmetic by about 2^-8, so a loss or a prototype layer in bf16 fails."""
    module, tail, inputs = tails()[name]
    loss, grads = tail_gradients(module, tail, inputs, bf16=True)
    loss64, grads64 = tail_gradients(module, tail, inputs, bf16=False)
    assert loss.dtype == torch.float32 and len(grads) == len(grads64) >= len(inputs) - 1
    assert abs(loss.item() - loss64.item()) <= 2 ** -12 * abs(loss64.item())
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.dtype == torch.float32 and (g.double() - g64).norm() <= 2 ** -12 * g64.norm(), i
