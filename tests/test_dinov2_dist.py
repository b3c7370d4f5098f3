"""DINOv2, 1 process vs 2 (gloo, CPU), one training step on the same global batch.

The DINO and iBOT terms match: their targets come from all-reduced statistics (Sinkhorn-Knopp's
sums and sample counts, the centres' sums and counts), the DINO term is a mean over equal
per-process batches, and the iBOT term's divisor is the per-process number of crops, equal on
every process, so DDP's gradient average is the 1-process gradient. KoLeo does NOT match: as in
DINOv2, each process takes nearest neighbours within its own images only, so the regulariser
depends on the per-GPU batch. The equality is checked with --koleo_loss_weight 0, and the KoLeo
difference is shown.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import dinov2
from test_simdino_dist import free_port

GLOBAL_BATCH, K = 8, 24
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "32", "--proj_dim", "8", "--out_dim", str(K), "--drop_path_rate", "0",
        "--koleo_loss_weight", "0"]
CASES = [("sinkhorn_knopp", False), ("centering", True)]         # (--centering, FSDP2 instead of DDP)


def one_step(rank, world_size, port, out):
    """One step on this process's share of a fixed global batch, for each case in turn."""
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for centering, fsdp in CASES:
        args = dinov2.get_args(TINY + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size), "--centering", centering]
                               + (["--fsdp"] if fsdp else []))
        torch.manual_seed(0)
        student, teacher = dinov2.build_networks(args)
        model = dinov2.distribute(student, teacher, args, world_size)
        optimizer = torch.optim.AdamW(dinov2.param_groups(student, 0.9, 0.2), lr=1e-3, weight_decay=0.04)
        g = torch.Generator().manual_seed(1)
        xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
        m = torch.rand(2, GLOBAL_BATCH, 4, generator=g) < 0.4                  # (M_glo, B, N): uneven per process
        center, patch_center = torch.randn(1, K, generator=g), torch.randn(1, K, generator=g)   # as after some steps
        share = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        xg, xl, m = xg[:, share], xl[:, share], m[:, share].flatten(0, 1)
        idx, w = m.flatten().nonzero().squeeze(1), dinov2.patch_weights(m)

        zsg, Zsg, zsl, ysg = model(xg, idx, m, xl)
        with torch.no_grad():
            ztg, Ztg = teacher(xg, idx)
            pt, Pt = dinov2.teacher_targets(ztg, Ztg, 0.05, centering, center, patch_center, 0.9)
        loss, dino_term, ibot_term, koleo_term = dinov2.dinov2_loss(zsg, zsl, pt, Zsg, Pt, w, ysg, 0.1, 1.0, 1.0,
                                                                    args.koleo_loss_weight)
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in student.named_parameters() if p.grad is not None}
        dinov2.clip_gradients(student, 0.01)                                    # small enough to clip every part
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - 0.9)
        terms = torch.stack([loss.detach(), dino_term, ibot_term, koleo_term])
        if world_size > 1:
            dist.all_reduce(terms)
            terms /= world_size
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        results[centering] = {"terms": terms, "grads": grads, "center": center, "patch_center": patch_center,
                              "student": get_model_state_dict(student, options=full),
                              "teacher": get_model_state_dict(teacher, options=full)}
    if rank == 0:
        torch.save(results, out)
    if world_size > 1:
        dist.destroy_process_group()


def test_one_vs_two_processes(tmp_path):
    one_step(0, 1, None, tmp_path / "one.pt")
    mp.start_processes(one_step, args=(2, free_port(), tmp_path / "two.pt"), nprocs=2, start_method="fork")
    single, double = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for centering, _ in CASES:
        one, two = single[centering], double[centering]
        # loss, DINO, iBOT: equal; KoLeo (weight 0 here): computed per process, so NOT equal
        torch.testing.assert_close(two["terms"][:3], one["terms"][:3], rtol=1e-5, atol=1e-6, msg=centering)
        assert abs(two["terms"][3] - one["terms"][3]) > 0.01
        assert one["terms"][2] > 0 and one["grads"]["backbone.mask_token"].abs().sum() > 0   # masking reached the loss
        for name in ("center", "patch_center"):
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=f"{centering} {name}")
        assert one["grads"].keys() == two["grads"].keys()
        for n, v in one["grads"].items():     # float32 sums in another order: errors ~1e-7 of the largest entry
            torch.testing.assert_close(two["grads"][n], v, rtol=1e-4, atol=1e-6 * v.abs().max().item() + 1e-9,
                                       msg=f"{centering} {n}")
        for part in ("student", "teacher"):
            for n, v in one[part].items():
                torch.testing.assert_close(two[part][n], v, rtol=1e-4, atol=1e-6, msg=f"{centering} {part} {n}")
    # the centres moved only under centering; Sinkhorn-Knopp leaves them alone
    g = torch.Generator().manual_seed(1)
    torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    torch.rand(2, GLOBAL_BATCH, 4, generator=g)
    initial = torch.randn(1, K, generator=g)
    torch.testing.assert_close(single["sinkhorn_knopp"]["center"], initial, rtol=0, atol=0)
    assert not torch.allclose(single["centering"]["center"], initial)
