"""DINO's pieces on tensors: loss, centre, temperatures, weight-normalised prototypes, last-layer freezing."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import dino


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def reference_loss(zsg, zsl, ztg, center, student_temp, teacher_temp):
    """Loops, float64, from the definitions: mean over pairs (i != j) of the batch mean of H(pt_j, ps_i)."""
    zs = list(zsg) + list(zsl)
    M_glo, B, K = zsg.shape
    pair_losses = []
    for i, j in itertools.product(range(len(zs)), range(M_glo)):
        if i == j:                                        # the student never predicts the teacher's own view
            continue
        per_sample = []
        for b in range(B):
            t = [(ztg[j][b][k] - center[0][k]).item() / teacher_temp for k in range(K)]
            t_max = max(t)
            pt = [math.exp(v - t_max) for v in t]
            pt = [v / sum(pt) for v in pt]
            s = [zs[i][b][k].item() / student_temp for k in range(K)]
            s_max = max(s)
            log_z = s_max + math.log(sum(math.exp(v - s_max) for v in s))
            per_sample.append(-sum(pt[k] * (s[k] - log_z) for k in range(K)))
        pair_losses.append(sum(per_sample) / B)
    return sum(pair_losses) / len(pair_losses), len(pair_losses)


@pytest.mark.parametrize("M_loc", [0, 3])
def test_loss_matches_hand_formula(M_loc):
    M_glo, B, K = 2, 4, 7
    zsg, zsl, ztg = randn(M_glo, B, K, seed=1), randn(M_loc, B, K, seed=2), randn(M_glo, B, K, seed=3)
    center = randn(1, K, seed=4, scale=0.3)
    loss, pt = dino.dino_loss(zsg, zsl, ztg, center, 0.1, 0.04)
    ref, n_pairs = reference_loss(zsg, zsl, ztg, center, 0.1, 0.04)
    assert n_pairs == (M_glo + M_loc) * M_glo - M_glo
    assert loss.dtype == torch.float64 and abs(loss.item() - ref) < 1e-10
    torch.testing.assert_close(pt, F.softmax((ztg - center) / 0.04, dim=-1))
    torch.testing.assert_close(pt.sum(-1), torch.ones(M_glo, B, dtype=torch.float64))
    # the centre and both temperatures matter
    for c, ts, tt in [(center * 0, 0.1, 0.04), (center, 0.2, 0.04), (center, 0.1, 0.07)]:
        assert abs(dino.dino_loss(zsg, zsl, ztg, c, ts, tt)[0].item() - ref) > 1e-3
        assert abs(dino.dino_loss(zsg, zsl, ztg, c, ts, tt)[0].item() - reference_loss(zsg, zsl, ztg, c, ts, tt)[0]) < 1e-10


def test_same_view_pairs_are_skipped():
    # student equal to the teacher, one global view sharp on prototype 0, the other on prototype 1:
    # only the two cross pairs count, and each costs about 1/tau_s (the student's log-odds gap)
    K, B = 5, 3
    ztg = torch.zeros(2, B, K, dtype=torch.float64)
    ztg[0, :, 0] = ztg[1, :, 1] = 1.0
    loss, _ = dino.dino_loss(ztg, ztg[:0], ztg, torch.zeros(1, K, dtype=torch.float64), 0.1, 1e-3)
    log_z = math.log(math.exp(10) + math.exp(0) * (K - 1))        # student softmax of [10, 0, 0, 0, 0]
    cross = -(0 - log_z)                                          # target one-hot on the other prototype
    assert abs(loss.item() - cross) < 1e-8
    same = -(10 - log_z)                                          # what a same-view pair would have cost
    assert abs(loss.item() - (cross + same) / 2) > 1


def test_gradient_is_student_softmax_minus_teacher_targets():
    M_glo, M_loc, B, K, ts = 2, 3, 4, 6, 0.1
    zsg = randn(M_glo, B, K, seed=5).requires_grad_()
    zsl = randn(M_loc, B, K, seed=6).requires_grad_()
    ztg = randn(M_glo, B, K, seed=7).requires_grad_()           # must get no gradient: targets are constants
    loss, pt = dino.dino_loss(zsg, zsl, ztg, randn(1, K, seed=8), ts, 0.05)
    loss.backward()
    assert ztg.grad is None
    n = (M_glo + M_loc) * M_glo - M_glo
    soft = lambda z: F.softmax(z.detach() / ts, dim=-1)
    # a global view i is paired with the other global view only; a local view with both
    torch.testing.assert_close(zsg.grad[0], (soft(zsg[0]) - pt[1]) / ts / (n * B))
    torch.testing.assert_close(zsg.grad[1], (soft(zsg[1]) - pt[0]) / ts / (n * B))
    torch.testing.assert_close(zsl.grad, (2 * soft(zsl) - pt.sum(0)) / ts / (n * B))


def test_loss_is_float32_under_bf16_autocast():
    M_glo, B, K = 2, 8, 64
    zsg, zsl, ztg = randn(M_glo, B, K, seed=1), randn(4, B, K, seed=2), randn(M_glo, B, K, seed=3)
    center = randn(1, K, seed=4, scale=0.1).float()
    ref, _ = dino.dino_loss(zsg, zsl, ztg, center.double(), 0.1, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, pt = dino.dino_loss(zsg.bfloat16(), zsl.bfloat16(), ztg.bfloat16(), center, 0.1, 0.04)
    assert low.dtype == torch.float32 and pt.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.02 * abs(ref.item())   # only the inputs' bf16 rounding


def test_update_center_is_an_ema_of_the_batch_mean():
    M_glo, B, K, m = 2, 5, 6, 0.9
    center = randn(1, K, seed=1).float()
    before = center.clone()
    ztg = randn(M_glo, B, K, seed=2)
    out = dino.update_center(center, ztg.bfloat16(), m)
    assert out is center and center.dtype == torch.float32 and center.shape == (1, K)   # in place
    batch_mean = ztg.bfloat16().double().reshape(-1, K).mean(0, keepdim=True)           # over views and samples
    torch.testing.assert_close(center.double(), m * before.double() + (1 - m) * batch_mean)
    # repeated on the same batch it converges to the batch mean
    for _ in range(300):
        dino.update_center(center, ztg, m)
    torch.testing.assert_close(center.double(), ztg.reshape(-1, K).mean(0, keepdim=True), rtol=1e-5, atol=1e-5)


def test_teacher_temperature_schedule():
    temps = dino.teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(temps) == 100
    assert temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07)
    assert temps[30:] == [0.07] * 70
    for e in range(30):                                           # linear in between: np.linspace over 30 epochs
        assert temps[e] == pytest.approx(0.04 + 0.03 * e / 29)
    assert dino.teacher_temp_schedule(0.04, 0.07, 0, 3) == [0.07] * 3      # no warm-up
    short = dino.teacher_temp_schedule(0.04, 0.07, 30, 2)                  # a run shorter than the warm-up
    assert len(short) >= 2 and short[1] == pytest.approx(0.04 + 0.03 / 29)
    defaults = dino.get_args([])
    assert (defaults.warmup_teacher_temp, defaults.teacher_temp, defaults.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (defaults.student_temp, defaults.center_momentum, defaults.out_dim) == (0.1, 0.9, 65536)
    assert (defaults.freeze_last_layer, defaults.norm_last_layer, defaults.local_crops_number) == (1, True, 10)


def test_teacher_entropy():
    K = 16
    assert dino.teacher_entropy(torch.full((2, 3, K), 1 / K)).item() == pytest.approx(math.log(K))
    assert dino.teacher_entropy(F.one_hot(torch.arange(6) % K, K).float().view(2, 3, K)).item() == 0.0
    p = F.softmax(randn(2, 3, K, seed=1), dim=-1)
    assert dino.teacher_entropy(p).item() == pytest.approx(-(p * p.log()).sum(-1).mean().item())


# ----------------------------------------------------------------------------- head

def test_head_layout_and_init():
    head = dino.DINOHead(12, hidden_dim=20, out_dim=8, num_prototypes=30)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                       "mlp.4.bias", "last_layer.weight_v", "last_layer.weight_g"]  # DINO's names
    assert [type(m) for m in head.mlp] == [torch.nn.Linear, torch.nn.GELU] * 2 + [torch.nn.Linear]
    assert head.last_layer.weight_v.shape == (30, 8) and head.last_layer.weight_g.shape == (30, 1)
    assert torch.equal(head.last_layer.weight_g, torch.ones(30, 1))
    assert head.last_layer.weight_v.abs().max() <= 1 / math.sqrt(8)   # nn.Linear's default, kept by DINO
    for i in (0, 2, 4):
        assert torch.equal(head.mlp[i].bias, torch.zeros_like(head.mlp[i].bias))
        assert 0.01 < head.mlp[i].weight.std() < 0.03                    # trunc_normal, std 0.02


def test_weight_norm_matches_torch_weight_norm():
    layer = dino.WeightNormLinear(8, 30, train_norm=True)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    ref = torch.nn.Linear(8, 30, bias=False)
    ref.weight.data.copy_(layer.weight_v)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    ref.parametrizations.weight.original0.data.copy_(layer.weight_g)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.weight.norm(dim=1), layer.weight_g.squeeze(1))


def test_frozen_norm_gives_unit_prototypes_and_no_gradient_to_g():
    torch.manual_seed(0)
    head = dino.DINOHead(12, hidden_dim=20, out_dim=8, num_prototypes=30, norm_last_layer=True)
    W = head.last_layer.weight.detach().double()
    torch.testing.assert_close(W.norm(dim=1), torch.ones(30, dtype=torch.float64))
    x = torch.randn(5, 12)
    scores = head(x)
    # the scores are cosines between the normalised bottleneck feature and each prototype
    feat = F.normalize(head.mlp(x).double(), dim=-1)
    torch.testing.assert_close(scores.double(), feat @ F.normalize(head.last_layer.weight_v.double(), dim=1).T)
    assert scores.abs().max() <= 1 + 1e-6
    scores.square().sum().backward()
    assert head.last_layer.weight_g.grad is None and head.last_layer.weight_v.grad is not None
    g_id = id(head.last_layer.weight_g)
    assert all(id(p) != g_id for group in dino.param_groups(head) for p in group["params"])   # not optimised
    optimizer = torch.optim.AdamW(dino.param_groups(head), lr=0.1, weight_decay=0.5)
    optimizer.step()
    assert torch.equal(head.last_layer.weight_g, torch.ones(30, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(30))     # still unit rows


def test_trainable_norm_learns_g():
    torch.manual_seed(0)
    head = dino.DINOHead(12, hidden_dim=20, out_dim=8, num_prototypes=30, norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad and torch.equal(head.last_layer.weight_g, torch.ones(30, 1))
    groups = dino.param_groups(head)
    g_id = id(head.last_layer.weight_g)
    assert any(id(p) == g_id for p in groups[0]["params"])       # (K, 1) is 2-D: decayed, as in DINO's param groups
    optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.0)
    head(torch.randn(5, 12)).square().sum().backward()
    assert head.last_layer.weight_g.grad.abs().sum() > 0
    optimizer.step()
    g = head.last_layer.weight_g.detach()
    assert not torch.equal(g, torch.ones(30, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), g.squeeze(1))


def test_head_scores_are_float32_under_bf16_autocast():
    head = dino.DINOHead(12, hidden_dim=20, out_dim=8, num_prototypes=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(5, 12)).dtype == torch.float32


# ----------------------------------------------------------------------------- last-layer freezing

TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--proj_hidden_dim", "32", "--proj_dim", "8", "--out_dim", "16"]


def test_cancelled_last_layer_is_left_alone_by_adamw():
    torch.manual_seed(0)
    args = dino.get_args(TINY + ["--no-norm_last_layer"])       # g trainable too: it must stay frozen as well
    student, teacher = dino.build_networks(args)
    optimizer = torch.optim.AdamW(dino.param_groups(student), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    xg, xl = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 4, 3, 8, 8)
    for epoch in (0, 1):                                         # --freeze_last_layer 1: frozen in epoch 0 only
        zsg, zsl = student(xg, xl)
        with torch.no_grad():
            ztg = teacher(xg)
        loss, _ = dino.dino_loss(zsg, zsl, ztg, torch.zeros(1, 16), 0.1, 0.04)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert student.head.last_layer.weight_v.grad.abs().sum() > 0
        if epoch < args.freeze_last_layer:
            dino.cancel_last_layer_gradients(student)
        optimizer.step()                                         # weight decay 0.1 would move it if it were stepped
        for n, p in student.named_parameters():
            if n.startswith("head.last_layer."):
                assert torch.equal(p, before[n]) == (epoch == 0), (epoch, n)
            elif n in ("head.mlp.4.weight", "backbone.blocks.0.attn.qkv.weight"):
                assert not torch.equal(p, before[n]), (epoch, n)
