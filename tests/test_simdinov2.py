"""SimDINOv2 (Algorithm 2): loss against float64 hand formulas, masking, optimiser groups,
1 vs 2 processes, end-to-end training, resume and bad input."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import simdinov2
import vit
from dist_step import BF16_VS_FLOAT32, SPLIT_IDS, SPLITS, assert_grads_close, assert_grads_within, autocast, \
    check_clipping_per_part, check_update, init, needs_native_bf16, record_step, share, spawn


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ----------------------------------------------------------------------------- loss

def reference_loss(zsg, zsl, ztg, Zs_all, Zt_all, m, eps, gamma, n, same_view_pairs, coding_rate_on, distance,
                   loss_weighting):
    """Loops, float64. Zs_all, Zt_all: (M_glo*B, N, d) patch features of every crop; m (M_glo*B, N)."""
    scale = 0.5 if distance == "half_sq" else 1.0
    zs = list(zsg) + list(zsl)
    M_glo, B, d = zsg.shape
    terms = []
    for i, j in itertools.product(range(len(zs)), range(M_glo)):
        if same_view_pairs == "skip" and i == j:
            continue
        terms.append(sum(scale * ((zs[i][b] - ztg[j][b]) ** 2).sum() for b in range(B)) / B)
    cls_term = sum(terms) / len(terms)
    per_crop = []
    for c in range(M_glo * B):                       # each crop: mean over its masked patches, 0 if none
        ks = [k for k in range(m.shape[1]) if m[c, k]]
        per_crop.append(sum(scale * ((Zs_all[c, k] - Zt_all[c, k]) ** 2).sum() for k in ks) / len(ks) if ks else 0.0)
    patch_term = sum(per_crop) / len(per_crop)
    rates = []
    for v in range(M_glo):
        Z = (zsg[v] + ztg[v]) / 2 if coding_rate_on == "mean" else zsg[v]
        for g in range(B // n):
            Zg = Z[g * n:(g + 1) * n]
            rates.append(0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / eps**2 * Zg.T @ Zg / n))
    w = 0.5 if loss_weighting == "paper" else 1.0
    return w * (cls_term + patch_term) - gamma * sum(rates) / len(rates), patch_term


@pytest.mark.parametrize("same_view_pairs,coding_rate_on,distance,loss_weighting",
                         list(itertools.product(["skip", "keep"], ["mean", "student"], ["half_sq", "sq"],
                                                ["released", "paper"])))
def test_loss_matches_hand_formula(same_view_pairs, coding_rate_on, distance, loss_weighting):
    M_glo, M_loc, B, N, d, n = 2, 2, 4, 6, 5, 2
    zsg, zsl, ztg = unit(M_glo, B, d, seed=1), unit(M_loc, B, d, seed=2), unit(M_glo, B, d, seed=3)
    Zs_all, Zt_all = unit(M_glo * B, N, d, seed=4), unit(M_glo * B, N, d, seed=5)
    m = torch.zeros(M_glo * B, N, dtype=torch.bool)
    m[0, [1, 2, 3]] = True                           # crops 0, 3, 6 masked to different extents,
    m[3, 5] = True                                   # the other five not masked at all
    m[6, :4] = True
    idx = m.flatten().nonzero().squeeze(1)
    Zsg, Ztg = Zs_all.flatten(0, 1)[idx], Zt_all.flatten(0, 1)[idx]
    w = torch.tensor([1 / 3] * 3 + [1.0] + [1 / 4] * 4, dtype=torch.float64)
    torch.testing.assert_close(simdinov2.patch_weights(m), w.float())
    loss, _, patch, _ = simdinov2.simdinov2_loss(zsg, zsl, ztg, Zsg, Ztg, w, 0.6, 0.2, n,
                                                 same_view_pairs, coding_rate_on, distance, loss_weighting)
    ref, ref_patch = reference_loss(zsg, zsl, ztg, Zs_all, Zt_all, m, 0.6, 0.2, n, same_view_pairs, coding_rate_on,
                                    distance, loss_weighting)
    assert abs(patch.item() - float(ref_patch)) < 1e-10
    assert abs(loss.item() - ref.item()) < 1e-10


def released_simdinov2_loss(student_cls, teacher_cls, Zs_masked, Zt_masked, masks, world_size, eps_code):
    """The released SimDINOv2 loss on one GPU, transcribed: its MCR loss on the CLS features of all crops
    (-mean cos over the cross-view pairs, minus gamma times the mean over global views of
    1/2 logdet(I + p/(m N eps_code) W^T W) with W = (student + teacher)/2, gamma = (p + N m)/(p N m)), plus its
    cosine patch loss (-sum over masked patches of cos / (masked patches of their crop), divided by the number
    of global crops), both weighted 1 as in the released config."""
    n_crops, m, p = student_cls.shape
    n_glob = teacher_cls.shape[0]
    sim = F.cosine_similarity(teacher_cls.unsqueeze(1), student_cls.unsqueeze(0), dim=-1).mean(-1)  # (2, M)
    sim.view(-1)[:: n_crops + 1].fill_(0)                                                          # same view
    comp = sim.sum() / (n_glob * n_crops - n_glob)
    W = (student_cls[:n_glob] + teacher_cls) / 2
    scalar = p / (m * world_size * eps_code)
    half_logdets = [0.5 * torch.logdet(torch.eye(p, dtype=W.dtype) + scalar * w.T @ w) for w in W]
    expa = sum(half_logdets) / n_glob * (p + world_size * m) / (p * world_size * m)
    cls_loss = -comp - expa
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    patch_loss = -(F.cosine_similarity(Zt_masked, Zs_masked, dim=-1) * masks_weight).sum() / masks.shape[0]
    return cls_loss + patch_loss


@pytest.mark.parametrize("B,masked_crops", [(4, [0, 3, 6]), (8, list(range(0, 16, 2))), (5, [1])])
def test_printed_loss_is_the_released_loss_plus_known_constants(B, masked_crops):
    """With the defaults, the printed loss = the released loss + 1 (the CLS term: 1/2||x - y||^2 = 1 - cos) +
    (global crops with masked patches) / (all global crops) (the patch term: each masked crop's weights sum to
    1). The second constant depends on the batch: int(2B * mask_probability) / 2B masked crops per batch."""
    M_glo, M_loc, N, d, world_size, eps_code = 2, 3, 9, 6, 8, 0.05
    g = torch.Generator().manual_seed(B)
    zsg, zsl, ztg = unit(M_glo, B, d, seed=B + 1), unit(M_loc, B, d, seed=B + 2), unit(M_glo, B, d, seed=B + 3)
    m = torch.zeros(M_glo * B, N, dtype=torch.bool)
    for c in masked_crops:
        m[c, torch.randperm(N, generator=g)[:1 + c % (N - 1)]] = True
    n_masked = int(m.sum())
    Zsg, Ztg = unit(n_masked, d, seed=B + 4), unit(n_masked, d, seed=B + 5)
    per_crop = m.sum(-1)
    w = (1.0 / per_crop.double().clamp(min=1)).repeat_interleave(per_crop)      # patch_weights(m), in float64
    torch.testing.assert_close(simdinov2.patch_weights(m), w.float())
    ours, _, _, _ = simdinov2.simdinov2_loss(zsg, zsl, ztg, Zsg, Ztg, w,
                                             math.sqrt(world_size * eps_code),
                                             simdinov2.released_gamma(d, world_size * B), B)
    released = released_simdinov2_loss(torch.cat([zsg, zsl]), ztg, Zsg, Ztg, m, world_size, eps_code)
    constant = 1 + len(masked_crops) / (M_glo * B)
    assert abs(ours.item() - (released.item() + constant)) < 1e-7      # the release's patch weights are float32


def test_patch_loss_is_zero_without_masked_patches():
    z = unit(2, 4, 5, seed=0)
    empty = torch.zeros(0, 5, dtype=torch.float64)
    loss, _, patch, _ = simdinov2.simdinov2_loss(z, z[:0], z, empty, empty, empty[:, 0], 1.0, 0.0, 4)
    assert patch.item() == 0.0 and torch.isfinite(loss)


# ----------------------------------------------------------------------------- masking in the network

TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--proj_hidden_dim", "64", "--proj_dim", "16", "--data", "synthetic:64",
        "--batch_size_per_gpu", "16", "--cov_group_size", "8", "--epochs", "2", "--warmup_epochs", "1",
        "--num_workers", "0", "--log_every", "1", "--saveckp_freq", "1"]


def test_student_uses_the_mask_token_and_the_teacher_does_not():
    args = simdinov2.get_args(TINY + ["--drop_path_rate", "0"])
    student, teacher = simdinov2.build_networks(args)
    student.eval()
    with torch.no_grad():
        student.backbone.mask_token.normal_()
    xg = torch.randn(2, 3, 3, 32, 32)                                  # (M_glo, B, 3, G, G), 4x4 patches
    m = torch.zeros(6, 16, dtype=torch.bool)
    m[1, [0, 5]] = True                                                # crop 1: patches 0 and 5
    idx = m.flatten().nonzero().squeeze(1)
    x2 = xg.clone()
    x2[0, 1, :, 0:8, 0:8] += 5.0                                       # change only the pixels of patch 0 of crop 1
    with torch.no_grad():
        zs, Zs = student(xg, idx, m)
        zs2, Zs2 = student(x2, idx, m)
        zt, Zt = teacher(xg, idx)
        zt2, Zt2 = teacher(x2, idx)
    torch.testing.assert_close(zs2, zs)                                # the student never sees masked pixels
    torch.testing.assert_close(Zs2, Zs)
    assert not torch.allclose(zt2[0, 1], zt[0, 1]) and not torch.allclose(Zt2, Zt)  # the teacher does
    assert Zs.shape == (2, 16)
    # and the masked token really is the mask token: same features whatever the masked pixels, as shown,
    # and different features from the unmasked crop
    with torch.no_grad():
        zs_unmasked, _ = student(xg, idx, torch.zeros_like(m))
    assert not torch.allclose(zs_unmasked[0, 1], zs[0, 1])
    torch.testing.assert_close(zs_unmasked[0, 0], zs[0, 0])


def test_layerwise_lr_decay_and_weight_decay_groups():
    args = simdinov2.get_args(TINY)
    student, _ = simdinov2.build_networks(args)
    groups = simdinov2.param_groups(student, 0.9, 0.2)
    mult = {id(p): (g["lr_mult"], g["wd_mult"]) for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    L = 12
    for i in range(L):
        assert mult[id(named[f"backbone.blocks.{i}.attn.qkv.weight"])] == (pytest.approx(0.9 ** (L - i)), 1.0)
        assert mult[id(named[f"backbone.blocks.{i}.attn.qkv.bias"])] == (pytest.approx(0.9 ** (L - i)), 0.0)
        assert mult[id(named[f"backbone.blocks.{i}.ls1.gamma"])][1] == 0.0
        assert mult[id(named[f"backbone.blocks.{i}.norm1.weight"])][1] == 0.0
    assert mult[id(named["backbone.patch_embed.proj.weight"])] == (pytest.approx(0.9 ** 13 * 0.2), 1.0)
    assert mult[id(named["backbone.cls_token"])] == (pytest.approx(0.9 ** 13), 1.0)
    assert mult[id(named["backbone.mask_token"])][0] == pytest.approx(0.9 ** 13)
    assert mult[id(named["backbone.register_tokens"])][0] == pytest.approx(0.9 ** 13)
    assert mult[id(named["backbone.norm.weight"])] == (1.0, 0.0)
    assert mult[id(named["head.mlp.0.weight"])] == (1.0, 1.0)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_clipping_is_per_module_global_norm():
    args = simdinov2.get_args(TINY)
    student, _ = simdinov2.build_networks(args)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    simdinov2.clip_gradients(student, 3.0)
    for part in (student.backbone, student.head):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in part.parameters()]))
        assert norm.item() == pytest.approx(3.0, rel=1e-4)


# ----------------------------------------------------------------------------- 1 process vs 2 and 4

GLOBAL_BATCH = 8
DIST = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--drop_path_rate", "0"]


def one_step(rank, world_size, fsdp, group_size, bf16, port, out):
    """Algorithm 2, one step, on this process's share of a fixed global batch (tests/dist_step.py); coding-rate
    groups of group_size, which span processes when larger than the per-process batch; bf16: as train() runs --bf16."""
    init(rank, world_size, port)
    args = simdinov2.get_args(DIST + ["--batch_size_per_gpu", str(GLOBAL_BATCH // world_size), "--cov_group_size",
                                      str(group_size)] + (["--fsdp"] if fsdp else []))
    cov_group = simdinov2.coding_rate_group(args.cov_group_size, args.batch_size_per_gpu)
    torch.manual_seed(0)
    student, teacher = simdinov2.build_networks(args)
    model = simdinov2.distribute(student, teacher, args, world_size, bf16)
    groups = simdinov2.param_groups(student, 0.9, 0.2)   # before the forward, as in train(): FSDP2 swaps parameters
    g = torch.Generator().manual_seed(1)
    xg, xl = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(3, GLOBAL_BATCH, 3, 8, 8, generator=g)
    m = torch.rand(2, GLOBAL_BATCH, 4, generator=g) < 0.4                      # (M_glo, B, N)
    xg, xl, m = share(xg, rank, world_size), share(xl, rank, world_size), share(m, rank, world_size).flatten(0, 1)
    idx, w = m.flatten().nonzero().squeeze(1), simdinov2.patch_weights(m)
    with autocast(bf16):
        zsg, Zsg, zsl = model(xg, idx, m, xl)
        with torch.no_grad():
            ztg, Ztg = teacher(xg, idx)
        gamma = simdinov2.released_gamma(args.proj_dim, GLOBAL_BATCH)
        loss = simdinov2.simdinov2_loss(zsg, zsl, ztg, Zsg, Ztg, w, args.eps, gamma, args.cov_group_size,
                                        cov_group=cov_group)[0]
    result = record_step(simdinov2, student, teacher, loss, groups, world_size)
    if rank == 0:
        torch.save(result, out)
    if world_size > 1:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process step, by group size."""
    folder = tmp_path_factory.mktemp("single")
    return {n: spawn(one_step, 1, folder / f"{n}.pt", False, n, False) for n in (2, 4, 8)}


def test_one_process_step(single):
    check_clipping_per_part(single[2], ["backbone.", "head."])
    check_update(single[2])
    assert single[2]["grads"]["backbone.mask_token"].abs().sum() > 0       # masking reached the mask token


@pytest.mark.parametrize("world_size, fsdp, group_size", [*((w, f, 2) for w, f in SPLITS), (2, True, 8), (4, False, 4)],
                         ids=SPLIT_IDS + ["2-fsdp2-spanning-8", "4-ddp-spanning-4"])
def test_one_vs_n_processes(single, world_size, fsdp, group_size, tmp_path):
    n = spawn(one_step, world_size, tmp_path / "n.pt", fsdp, group_size, False)
    torch.testing.assert_close(n["loss"], single[group_size]["loss"], rtol=1e-5, atol=1e-6)
    assert_grads_close(n["grads"], single[group_size]["grads"], "gradient")
    assert_grads_close(n["clipped"], single[group_size]["clipped"], "clipped gradient")
    check_update(n)


@needs_native_bf16
def test_bf16_gradients_agree_with_float32(single, tmp_path):
    """One step under --bf16 against the float32 one, each gradient within BF16_VS_FLOAT32 (dist_step) of it."""
    low = spawn(one_step, 1, tmp_path / "bf16.pt", False, 2, True)
    assert_grads_within(low["grads"], single[2]["grads"], BF16_VS_FLOAT32, "bf16 vs float32")
    torch.testing.assert_close(low["loss"], single[2]["loss"], rtol=BF16_VS_FLOAT32, atol=0)


# ----------------------------------------------------------------------------- end to end

def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("v2a"))
    simdinov2.train(simdinov2.get_args(TINY + ["--output_dir", out]))
    return out


def released_cosine_scheduler(base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0.0,
                              freeze_iters=0):
    """The SimDINO release's CosineScheduler (simdinov2/utils/utils.py), transcribed: DINOv2's cosine array, read
    through its own __getitem__, whose warm-up is a formula (the np.linspace of DINOv2 is commented out there)."""
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))

    def getitem(it):
        if it >= total_iters:
            return final_value
        if it < freeze_iters:
            return 0.0
        if it < freeze_iters + warmup_iters:
            return start_warmup_value + (base_value - start_warmup_value) * (it - freeze_iters) / warmup_iters
        return cosine[it - freeze_iters - warmup_iters]
    return np.array([getitem(it) for it in range(total_iters)])


def test_lr_warm_up_is_the_simdino_releases_not_dinov2s():
    """Step i of W warm-up steps is i / W of the way up, and the cosine starts at the peak: DINOv2's linspace form
    (i / (W - 1)) differs from the second step on, by up to 1 / (W - 1) of the lr."""
    for warmup_epochs, iters_per_epoch, epochs in [(1, 4, 3), (2, 5, 4), (0, 3, 2), (10, 125, 100)]:
        total, W = epochs * iters_per_epoch, warmup_epochs * iters_per_epoch
        ours = simdinov2.cosine_schedule(0.004, 1e-6, epochs, iters_per_epoch, warmup_epochs, 1e-6)
        assert ours == released_cosine_scheduler(0.004, 1e-6, total, W, start_warmup_value=1e-6).tolist()
    ours = simdinov2.cosine_schedule(1.0, 0.0, 2, 4, 1, 0.0)
    assert ours[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]                       # linspace would give 0, 1/3, 2/3, 1, 1


def test_training_log_schedule_and_checkpoint(run_a):
    log = read_log(run_a)
    assert [r["iteration"] for r in log] == list(range(8))
    assert log[4]["lr"] == pytest.approx(0.004 * (16 / 1024) ** 0.5)           # sqrt scaling, the peak after warm-up
    # the released schedules: lr warm-up from min_lr (not 0), then cosine to min_lr; weight decay and momentum cosine
    peak, total, warmup = 0.004 * (16 / 1024) ** 0.5, 8, 4
    expected = {"lr": released_cosine_scheduler(peak, 1e-6, total, warmup, start_warmup_value=1e-6),
                "wd": released_cosine_scheduler(0.04, 0.4, total),
                "momentum": released_cosine_scheduler(0.9, 1.0, total)}
    for key, values in expected.items():
        assert [r[key] for r in log] == pytest.approx(values.tolist(), rel=1e-12, abs=1e-15), key
    assert log[0]["lr"] == pytest.approx(1e-6)
    gamma = simdinov2.released_gamma(16, 16)
    for r in log:
        assert r["loss"] == pytest.approx(r["distance"] + r["patch_distance"] - gamma * r["R_eps"], rel=1e-5, abs=1e-6)
        assert r["patch_distance"] > 0
    teacher = vit.vit_from_checkpoint(os.path.join(run_a, "checkpoint.pth"))
    assert teacher.num_register_tokens == 4 and isinstance(teacher.blocks[0].ls1, vit.LayerScale)


def test_resume_reproduces_the_uninterrupted_run(run_a, tmp_path):
    out = str(tmp_path / "b")
    simdinov2.train(simdinov2.get_args(TINY + ["--output_dir", out, "--resume", os.path.join(run_a, "checkpoint0001.pth")]))
    resumed, full = read_log(out), read_log(run_a)[4:]
    assert [r["iteration"] for r in resumed] == [4, 5, 6, 7]
    for a, b in zip(resumed, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["patch_distance"] == pytest.approx(b["patch_distance"], rel=1e-5, abs=1e-6)


def test_clip_grad_0_trains_without_clipping(monkeypatch, tmp_path):
    """--clip_grad 0 steps the optimiser every iteration without clipping (the release's clip_grad 0 never steps)."""
    def no_clipping(*a):
        raise AssertionError("clip_gradients called with --clip_grad 0")
    steps = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(simdinov2, "clip_gradients", no_clipping)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    simdinov2.train(simdinov2.get_args(TINY + ["--output_dir", str(tmp_path), "--clip_grad", "0", "--epochs", "1",
                                               "--epoch_length", "2", "--saveckp_freq", "0"]))
    assert len(steps) == 2


@pytest.mark.parametrize("extra,phrase", [
    (["--mask_ratio", "0.5", "0.1"], "--mask_ratio 0.5 0.1"),
    (["--local_crops_size", "12"], "--local_crops_size 12 is not divisible by --patch_size 8"),
])
def test_bad_input(extra, phrase, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        simdinov2.train(simdinov2.get_args(TINY + ["--output_dir", str(tmp_path), *extra]))
    msg = str(exit_info.value.code)
    assert msg.startswith("error: ") and phrase in msg, msg
