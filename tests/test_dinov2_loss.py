"""DINOv2's pieces on tensors, against float64 formulas written out with loops: Sinkhorn-Knopp
(also split over 2 gloo processes), centering, the DINO, iBOT and KoLeo terms, the teacher
temperature schedule, the weight-normalised prototypes, the optimiser groups and the clipping."""
import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dinov2
from dist_step import free_port


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- references (python floats = float64)

def ref_sinkhorn(scores, temp, n_iterations):
    """Sinkhorn-Knopp as DINOv2 writes it, element by element: Q (K x n) = exp(s / temp)^T, total mass 1,
    then n_iterations x (rows to 1/K, columns to 1/n), finally x n. Returns n lists of K floats."""
    n, K = len(scores), len(scores[0])
    Q = [[math.exp(scores[b][k] / temp) for b in range(n)] for k in range(K)]
    total = sum(map(sum, Q))
    Q = [[q / total for q in row] for row in Q]
    for _ in range(n_iterations):
        for k in range(K):
            r = sum(Q[k])
            Q[k] = [q / r / K for q in Q[k]]
        for b in range(n):
            c = sum(Q[k][b] for k in range(K))
            for k in range(K):
                Q[k][b] = Q[k][b] / c / n
    return [[Q[k][b] * n for k in range(K)] for b in range(n)]


def ref_softmax(v):
    top = max(v)
    e = [math.exp(x - top) for x in v]
    return [x / sum(e) for x in e]


def ref_log_softmax(v):
    top = max(v)
    log_z = top + math.log(sum(math.exp(x - top) for x in v))
    return [x - log_z for x in v]


def ref_ce(target, scores, temp):
    """H(target, softmax(scores / temp)) = -sum_k target_k log softmax_k."""
    ls = ref_log_softmax([s / temp for s in scores])
    return -sum(t * l for t, l in zip(target, ls))


def ref_targets(ztg, centering, center, temp):
    """Teacher targets of the global views (M_glo, B, K) as nested lists: one Sinkhorn-Knopp over all M_glo*B
    CLS scores, or the centred softmax."""
    M_glo, B, K = ztg.shape
    if centering == "sinkhorn_knopp":
        flat = ref_sinkhorn(ztg.flatten(0, 1).tolist(), temp, 3)
        return [flat[j * B:(j + 1) * B] for j in range(M_glo)]
    return [[ref_softmax([(ztg[j, b, k] - center[0, k]).item() / temp for k in range(K)]) for b in range(B)]
            for j in range(M_glo)]


def ref_dino_loss_as_released(zsg, zsl, pt, student_temp):
    """DINOv2's ssl_meta_arch.py, in loops: the local crops against both global targets, and the 2 global
    crops (concatenated) against the swapped global targets, scaled by 2, each / (n_global + n_local terms)."""
    M_glo, B, _ = zsg.shape
    M_loc = len(zsl)
    n_terms = (M_glo - 1) * M_glo + max(M_loc * M_glo, 1)
    local = sum(sum(ref_ce(pt[j][b], zsl[i, b].tolist(), student_temp) for b in range(B)) / B
                for i in range(M_loc) for j in range(M_glo)) / n_terms
    swapped = [(1 - v, b) for v in range(M_glo) for b in range(B)]    # student row (v, b) meets target (1 - v, b)
    glob = sum(ref_ce(pt[jv][b], zsg[v, b].tolist(), student_temp) for (jv, b), (v, _) in
               zip(swapped, [(v, b) for v in range(M_glo) for b in range(B)])) / (M_glo * B)
    return local + glob * 2 / n_terms


# ----------------------------------------------------------------------------- Sinkhorn-Knopp

def test_sinkhorn_knopp_matches_the_reference_and_its_marginals():
    n, K, temp = 12, 5, 0.1
    s = randn(n, K, seed=1, scale=0.2)
    Q = dinov2.sinkhorn_knopp(s, temp, n_iterations=3)
    assert Q.dtype == torch.float64 and Q.shape == (n, K)
    torch.testing.assert_close(Q, torch.tensor(ref_sinkhorn(s.tolist(), temp, 3), dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(Q.sum(1), torch.ones(n, dtype=torch.float64), rtol=1e-12, atol=0)  # samples: 1 each
    # prototypes: each gets n/K in the limit; 3 iterations go part of the way from the softmax (0.8 off here)
    softmax_gap = (torch.softmax(s / temp, -1).sum(0) - n / K).abs().max()
    gaps = [(dinov2.sinkhorn_knopp(s, temp, it).sum(0) - n / K).abs().max() for it in (3, 10, 300)]
    assert softmax_gap > 0.7 and 0.5 > gaps[0] > 0.1 and gaps[0] > gaps[1] > gaps[2]
    Q = dinov2.sinkhorn_knopp(s, temp, n_iterations=300)
    torch.testing.assert_close(Q.sum(0), torch.full((K,), n / K, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(Q.sum(1), torch.ones(n, dtype=torch.float64), rtol=1e-12, atol=0)
    # float32 scores, as in training: the same numbers to float32 precision, also where exp(s / temp) overflows
    torch.testing.assert_close(dinov2.sinkhorn_knopp(s.float(), temp), dinov2.sinkhorn_knopp(s, temp).float())
    big = 4 + torch.tanh(s)                                                # scores of prototypes with norm 5
    assert not torch.isfinite(torch.exp(big.float() / 0.04)).all()
    torch.testing.assert_close(dinov2.sinkhorn_knopp(big.float(), 0.04),
                               torch.tensor(ref_sinkhorn(big.tolist(), 0.04, 3), dtype=torch.float32))


def test_sinkhorn_knopp_evens_out_a_collapsed_teacher():
    # every sample prefers prototype 0: softmax would put all the mass there, Sinkhorn-Knopp spreads it
    n, K = 8, 4
    s = torch.zeros(n, K, dtype=torch.float64)
    s[:, 0] = 1.0
    s += randn(n, K, seed=2, scale=0.01)
    Q = dinov2.sinkhorn_knopp(s, 0.1, n_iterations=100)
    assert torch.softmax(s / 0.1, -1)[:, 0].min() > 0.99
    torch.testing.assert_close(Q.sum(0), torch.full((K,), n / K, dtype=torch.float64), rtol=1e-6, atol=0)


def _distributed_pieces(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    s = randn(10, 6, seed=3)
    result = {}
    for name, cut in [("even", 5), ("uneven", 3), ("one empty", 0)]:     # rank 0 gets s[:cut], rank 1 the rest
        mine = s[:cut] if rank == 0 else s[cut:]
        result[f"sk {name}"] = dinov2.sinkhorn_knopp(mine, 0.07)
        center = torch.ones(1, 6, dtype=torch.float64)
        result[f"center {name}"] = dinov2.update_center(center, mine, 0.9).clone()
    empty = dinov2.update_center(torch.ones(1, 6, dtype=torch.float64), s[:0], 0.9)     # no sample anywhere
    result["center none"] = empty.clone()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_sinkhorn_knopp_and_centre_on_2_processes_equal_1_process(tmp_path):
    """Each process holds some rows of the batch (the masked patches: uneven, maybe none); the all-reduced
    sums make each process's targets its rows of the 1-process result, and the centre the global mean."""
    mp.start_processes(_distributed_pieces, args=(2, free_port(), tmp_path / "r.pt"), nprocs=2, start_method="fork")
    r0, r1 = torch.load(tmp_path / "r.pt")
    s = randn(10, 6, seed=3)
    whole = dinov2.sinkhorn_knopp(s, 0.07)
    mean = torch.ones(1, 6, dtype=torch.float64) * 0.9 + 0.1 * s.mean(0, keepdim=True)
    for name in ("even", "uneven", "one empty"):
        torch.testing.assert_close(torch.cat([r0[f"sk {name}"], r1[f"sk {name}"]]), whole, rtol=1e-12, atol=1e-14)
        for r in (r0, r1):
            torch.testing.assert_close(r[f"center {name}"], mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r0["center none"], torch.ones(1, 6, dtype=torch.float64))


# ----------------------------------------------------------------------------- centering, DINO loss

def test_centering_targets_and_centre_update():
    M_glo, B, K = 2, 3, 5
    ztg, center = randn(M_glo, B, K, seed=4), randn(1, K, seed=5, scale=0.3)
    pt = dinov2.softmax_center(ztg, center, 0.04)
    for j, b in itertools.product(range(M_glo), range(B)):
        ref = ref_softmax([(ztg[j, b, k] - center[0, k]).item() / 0.04 for k in range(K)])
        torch.testing.assert_close(pt[j, b], torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    expected = [0.9 * center[0, k].item() + 0.1 * sum(ztg[j, b, k].item() for j in range(M_glo) for b in range(B))
                / (M_glo * B) for k in range(K)]
    out = dinov2.update_center(center, ztg, 0.9)
    assert out is center                                                  # in place
    torch.testing.assert_close(center[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    before = center.clone()
    dinov2.update_center(center, ztg[:0], 0.9)                            # no masked patch: the centre stays
    torch.testing.assert_close(center, before, rtol=0, atol=0)


def test_teacher_targets_use_then_move_the_centres():
    ztg, Ztg = randn(2, 3, 5, seed=6), randn(7, 5, seed=7)
    c, pc = randn(1, 5, seed=8), randn(1, 5, seed=9)
    c0, pc0 = c.clone(), pc.clone()
    pt, Pt = dinov2.teacher_targets(ztg, Ztg, 0.05, "centering", c, pc, 0.9)
    torch.testing.assert_close(pt, dinov2.softmax_center(ztg, c0, 0.05))          # the old centres
    torch.testing.assert_close(Pt, dinov2.softmax_center(Ztg, pc0, 0.05))
    torch.testing.assert_close(c, 0.9 * c0 + 0.1 * ztg.mean((0, 1)))               # each its own centre
    torch.testing.assert_close(pc, 0.9 * pc0 + 0.1 * Ztg.mean(0))
    pt, Pt = dinov2.teacher_targets(ztg, Ztg, 0.05, "sinkhorn_knopp", c, pc, 0.9)
    torch.testing.assert_close(pt.flatten(0, 1), dinov2.sinkhorn_knopp(ztg.flatten(0, 1), 0.05))  # both views at once
    torch.testing.assert_close(Pt, dinov2.sinkhorn_knopp(Ztg, 0.05))


@pytest.mark.parametrize("centering,M_loc", [("centering", 3), ("sinkhorn_knopp", 3), ("sinkhorn_knopp", 0)])
def test_dino_loss_matches_the_released_formula(centering, M_loc):
    M_glo, B, K = 2, 4, 6
    zsg, zsl, ztg = randn(M_glo, B, K, seed=10), randn(M_loc, B, K, seed=11), randn(M_glo, B, K, seed=12)
    center = randn(1, K, seed=13, scale=0.3)
    pt_ref = ref_targets(ztg, centering, center, 0.04)
    pt, _ = dinov2.teacher_targets(ztg, randn(0, K), 0.04, centering, center.clone(), randn(1, K), 0.9)
    torch.testing.assert_close(pt, torch.tensor(pt_ref, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    loss = dinov2.dino_loss(zsg, zsl, pt, 0.1)
    ref = ref_dino_loss_as_released(zsg, zsl, pt_ref, 0.1)
    assert loss.dtype == torch.float64 and abs(loss.item() - ref) < 1e-10
    # the same as the mean over the (i, j != i) pairs when there are local views; 3 terms, not 2, without
    pairs = [sum(ref_ce(pt_ref[j][b], (list(zsg) + list(zsl))[i][b].tolist(), 0.1) for b in range(B)) / B
             for i in range(M_glo + M_loc) for j in range(M_glo) if i != j]
    assert len(pairs) == (M_glo + M_loc) * M_glo - M_glo
    assert abs(loss.item() - sum(pairs) / (len(pairs) if M_loc else 3)) < 1e-10


def test_dino_loss_skips_same_view_pairs():
    # the student equals the teacher; view 0's target is one-hot on prototype 0, view 1's on prototype 1.
    # Only cross pairs count: each costs the student's log-odds gap, about 1/tau_s
    K, B = 5, 3
    z = torch.zeros(2, B, K, dtype=torch.float64)
    z[0, :, 0] = z[1, :, 1] = 1.0
    loss = dinov2.dino_loss(z, z[:0], z, 0.1)
    log_z = math.log(math.exp(10) + K - 1)
    cross, same = log_z - 0.0, log_z - 10.0
    assert abs(loss.item() - 2 * cross / 3) < 1e-10                        # 2 cross pairs, / (2 + max(0, 1))
    assert abs(loss.item() - 2 * (cross + same) / 4) > 1


# ----------------------------------------------------------------------------- iBOT, KoLeo, the whole objective

def test_ibot_loss_matches_hand_formula_with_unmasked_crops():
    n_crops, N, K = 6, 5, 4
    m = torch.zeros(n_crops, N, dtype=torch.bool)
    m[0, [0, 2, 3]] = True                   # crops 0, 2 and 5 masked to different extents, 1, 3 and 4 not at all
    m[2, 4] = True
    m[5, :] = True
    Zs_all, Pt_all = randn(n_crops, N, K, seed=14), torch.softmax(randn(n_crops, N, K, seed=15), -1)
    idx = m.flatten().nonzero().squeeze(1)
    w = torch.tensor([1 / 3] * 3 + [1.0] + [1 / N] * N, dtype=torch.float64)
    torch.testing.assert_close(dinov2.patch_weights(m), w.float())
    loss = dinov2.ibot_loss(Zs_all.flatten(0, 1)[idx], Pt_all.flatten(0, 1)[idx], w, n_crops, 0.1)
    per_crop = []
    for c in range(n_crops):
        ks = [k for k in range(N) if m[c, k]]
        per_crop.append(sum(ref_ce(Pt_all[c, k].tolist(), Zs_all[c, k].tolist(), 0.1) for k in ks) / len(ks)
                        if ks else 0.0)
    assert abs(loss.item() - sum(per_crop) / n_crops) < 1e-10
    empty = torch.zeros(0, K, dtype=torch.float64)
    assert dinov2.ibot_loss(empty, empty, empty[:, 0], n_crops, 0.1).item() == 0.0


def test_koleo_on_points_of_a_circle():
    # unit vectors at 0, 60 and 180 degrees (given at other lengths: KoLeo normalises): the nearest neighbours
    # are 1 <-> 0 at distance 1 and 2 -> 1 at distance sqrt(3), so the loss is -(0 + 0 + log sqrt 3) / 3
    pts = torch.tensor([[1.0, 0.0], [math.cos(math.pi / 3), math.sin(math.pi / 3)], [-1.0, 0.0]], dtype=torch.float64)
    x = pts * torch.tensor([[2.0], [0.5], [7.0]], dtype=torch.float64)
    assert abs(dinov2.koleo_loss(x).item() + math.log(3) / 6) < 1e-7
    # a fourth point next to point 2 makes them each other's nearest neighbours
    x = torch.cat([x, torch.tensor([[-1.0, 0.1]], dtype=torch.float64)])
    d = 2 * math.sin(math.atan(0.1) / 2)                                   # chord between 180 deg and 180 - 5.7 deg
    assert abs(dinov2.koleo_loss(x).item() + (0 + 0 + 2 * math.log(d)) / 4) < 1e-6
    # descending the gradient moves the close pair 2 (180 deg) and 3 (174 deg) apart along the circle
    y = x.clone().requires_grad_()
    dinov2.koleo_loss(y).backward()
    assert -y.grad[3, 1] > 0 > -y.grad[2, 1]


def test_dinov2_loss_adds_the_terms_with_their_weights():
    M_glo, M_loc, B, K, D = 2, 2, 4, 6, 5
    zsg, zsl, ztg = randn(M_glo, B, K, seed=16), randn(M_loc, B, K, seed=17), randn(M_glo, B, K, seed=18)
    m = torch.rand(M_glo * B, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    n = int(m.sum())
    Zsg, Ztg, ysg = randn(n, K, seed=19), randn(n, K, seed=20), randn(M_glo, B, D, seed=21)
    pt, Pt = dinov2.sinkhorn_knopp(ztg.flatten(0, 1), 0.05).unflatten(0, (M_glo, B)), dinov2.sinkhorn_knopp(Ztg, 0.05)
    w = dinov2.patch_weights(m).double()
    loss, d, i, k = dinov2.dinov2_loss(zsg, zsl, pt, Zsg, Pt, w, ysg, 0.1, 0.5, 2.0, 0.3)
    assert abs(d.item() - dinov2.dino_loss(zsg, zsl, pt, 0.1).item()) < 1e-12
    assert abs(i.item() - dinov2.ibot_loss(Zsg, Pt, w, M_glo * B, 0.1).item()) < 1e-12
    # KoLeo per global crop, summed: never between the two views of one image
    assert abs(k.item() - dinov2.koleo_loss(ysg[0]).item() - dinov2.koleo_loss(ysg[1]).item()) < 1e-12
    assert abs(k.item() - dinov2.koleo_loss(ysg.flatten(0, 1)).item()) > 1e-3
    assert abs(loss.item() - (0.5 * d + 2.0 * i + 0.3 * k).item()) < 1e-12


# ----------------------------------------------------------------------------- schedules, head, optimiser

def test_teacher_temperature_warms_up_per_iteration():
    # DINOv2's CosineScheduler(base=final=0.07, warmup from 0.04 over warmup_epochs * iters): linear, then 0.07
    temps = dinov2.cosine_schedule(0.07, 0.07, 5, 4, 3, 0.04)
    assert len(temps) == 20
    for it in range(12):
        assert temps[it] == pytest.approx(0.04 + 0.03 * it / 11, abs=1e-15)
    assert temps[12:] == pytest.approx([0.07] * 8, abs=1e-15)


TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "32", "--proj_dim", "8", "--out_dim", "24", "--ibot_out_dim", "20"]


def test_weight_normalised_prototypes():
    args = dinov2.get_args(TINY)
    student, teacher = dinov2.build_networks(args)
    layer = student.dino_head.last_layer
    assert layer.weight_v.shape == (24, 8) and layer.weight_g.shape == (24, 1)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(24))            # unit rows at the start
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert layer(x).abs().max() <= 1 + 1e-6                                        # scores are cosines
    assert layer.weight_g.requires_grad                                             # DINOv2 trains g ...
    with torch.no_grad():
        layer.weight_g.mul_(2.0)
        layer.weight_v.mul_(3.0)                                                    # ... the direction's length never counts
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.full((24,), 2.0))
    fixed, _ = dinov2.build_networks(dinov2.get_args(TINY + ["--norm_last_layer"]))
    assert not fixed.dino_head.last_layer.weight_g.requires_grad                   # DINO's choice: g stays 1
    assert all(p is not fixed.dino_head.last_layer.weight_g
               for g in dinov2.param_groups(fixed, 0.9, 0.2) for p in g["params"])
    # the teacher has the same heads and no gradients; keys as in DINOv2's checkpoints
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {"dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v"} <= set(teacher.state_dict())
    assert student.ibot_head is None


def test_last_layer_groups_and_separate_head_clipping():
    args = dinov2.get_args(TINY + ["--ibot_separate_head"])
    student, _ = dinov2.build_networks(args)
    assert student.ibot_head.last_layer.weight_v.shape == (20, 8)
    groups = dinov2.param_groups(student, 0.9, 0.2)
    names = {id(p): n for n, p in student.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["last_layer"] == (".last_layer." in names[id(p)])
            if names[id(p)].startswith(("dino_head.", "ibot_head.")):
                assert g["lr_mult"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(names)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    dinov2.clip_gradients(student, 3.0)
    for part in (student.backbone, student.dino_head, student.ibot_head):         # each clipped on its own
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in part.parameters()]))
        assert norm.item() == pytest.approx(3.0, rel=1e-4)
