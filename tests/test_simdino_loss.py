"""SimDINO's loss (eqs. 6-8, Algorithm 1) against float64 formulas written out by hand."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from simdino import coding_rate, released_gamma, simdino_loss


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def reference_loss(zsg, zsl, ztg, eps, gamma, n, same_view_pairs, coding_rate_on, distance):
    """Loops, float64, straight from the paper's definitions."""
    zs = list(zsg) + list(zsl)
    M_glo, B, d = zsg.shape
    terms = []
    for i, j in itertools.product(range(len(zs)), range(M_glo)):
        if same_view_pairs == "skip" and i == j:
            continue
        per_sample = [((zs[i][b] - ztg[j][b]) ** 2).sum() for b in range(B)]
        scale = 0.5 if distance == "half_sq" else 1.0
        terms.append(scale * sum(per_sample) / B)
    dist = sum(terms) / len(terms)
    rates = []
    for v in range(M_glo):
        Z = (zsg[v] + ztg[v]) / 2 if coding_rate_on == "mean" else zsg[v]
        for g in range(B // n):
            Zg = Z[g * n:(g + 1) * n]
            S = Zg.T @ Zg / n
            rates.append(0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / eps**2 * S))
    R = sum(rates) / len(rates)
    return dist - gamma * R, dist, R


@pytest.mark.parametrize("same_view_pairs,coding_rate_on,distance",
                         list(itertools.product(["skip", "keep"], ["mean", "student"], ["half_sq", "sq"])))
def test_loss_matches_hand_formula(same_view_pairs, coding_rate_on, distance):
    M_glo, M_loc, B, d, n = 2, 3, 8, 6, 4
    zsg, zsl, ztg = unit(M_glo, B, d, seed=1), unit(M_loc, B, d, seed=2), unit(M_glo, B, d, seed=3)
    eps, gamma = 0.7, 0.3
    loss, dist, R = simdino_loss(zsg, zsl, ztg, eps, gamma, n, same_view_pairs, coding_rate_on, distance)
    ref, ref_dist, ref_R = reference_loss(zsg, zsl, ztg, eps, gamma, n, same_view_pairs, coding_rate_on, distance)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) < 1e-10 and abs(dist.item() - ref_dist.item()) < 1e-10
    assert abs(R.item() - ref_R.item()) < 1e-10
    low, _, _ = simdino_loss(zsg.bfloat16(), zsl.bfloat16(), ztg.bfloat16(), eps, gamma, n, same_view_pairs,
                             coding_rate_on, distance)
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 0.05 * abs(ref.item())


def test_same_view_pairs():
    # student equal to the teacher on the global views, no local views: only cross-view pairs cost anything
    ztg = unit(2, 5, 4, seed=0)
    zsl = ztg[:0]
    cross = 0.5 * (ztg[0] - ztg[1]).square().sum(-1).mean()
    _, skip, _ = simdino_loss(ztg, zsl, ztg, 1.0, 0.0, 5, "skip")
    _, keep, _ = simdino_loss(ztg, zsl, ztg, 1.0, 0.0, 5, "keep")
    torch.testing.assert_close(skip.double(), cross)        # 2 cross pairs out of 2
    torch.testing.assert_close(keep.double(), cross / 2)    # 2 cross pairs out of 4


def test_defaults_equal_released_code_up_to_a_constant():
    """Released MCRLoss, per GPU (m samples, N GPUs, eps_code): -mean cos - gamma sum log diag chol(I + p/(m N eps_code) W^T W).

    With the paper's eps^2 = N * eps_code and groups of m samples, eq. 8 with d = 1/2||.||^2
    is that plus 1 (since 1/2||x - y||^2 = 1 - cos for unit vectors).
    """
    N, m, p, eps_code = 8, 16, 32, 0.05
    zsg, zsl, ztg = unit(2, m, p, seed=4), unit(4, m, p, seed=5), unit(2, m, p, seed=6)
    zs = torch.cat([zsg, zsl])
    cos = F.cosine_similarity(ztg.unsqueeze(1), zs.unsqueeze(0), dim=-1)   # (2, M, m)
    cos[0, 0] = cos[1, 1] = 0
    comp = cos.mean(2).sum() / (2 * len(zs) - 2)
    W = (zsg + ztg) / 2
    half_logdets = [torch.linalg.cholesky(torch.eye(p, dtype=torch.float64) + p / (m * N * eps_code) * w.T @ w)
                    .diagonal().log().sum() for w in W]
    gamma = (p + N * m) / (p * N * m)
    released = -comp - gamma * sum(half_logdets) / 2
    ours, _, _ = simdino_loss(zsg, zsl, ztg, math.sqrt(N * eps_code), released_gamma(p, N * m), m)
    assert released_gamma(256, 512) == pytest.approx(768 / 131072)
    assert abs(ours.item() - (released.item() + 1)) < 1e-5


def test_coding_rate_against_logdet():
    Z = unit(3, 2, 10, 5, seed=7)                                         # leading batch dims (3, 2)
    R = coding_rate(Z, 0.5)
    assert R.shape == (3, 2) and R.dtype == torch.float64
    for a, b in itertools.product(range(3), range(2)):
        S = Z[a, b].T @ Z[a, b] / 10
        ref = 0.5 * torch.logdet(torch.eye(5, dtype=torch.float64) + 5 / 0.25 * S)
        assert abs(R[a, b].item() - ref.item()) < 1e-10
    assert coding_rate(Z.float(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("kind", ["collapsed", "rank3", "spread"])
def test_coding_rate_finite_in_bf16_with_large_batch_and_small_eps(kind):
    # float32 Cholesky returns NaN for these (n=8192, d=256, eps=1e-4); float64 does not
    g = torch.Generator().manual_seed(0)
    n, d = 8192, 256
    if kind == "collapsed":
        Z = F.normalize(torch.randn(1, d, generator=g), dim=-1).expand(n, d)
    elif kind == "rank3":
        Z = F.normalize(torch.randn(n, 3, generator=g) @ torch.randn(3, d, generator=g), dim=-1)
    else:
        Z = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    Zb = Z.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        R = coding_rate(Zb, 1e-4)
    assert R.dtype == torch.float32 and torch.isfinite(R)
    Z64 = Zb.detach().double()
    ref = 0.5 * torch.linalg.slogdet(torch.eye(d, dtype=torch.float64) + d / 1e-8 * Z64.T @ Z64 / n)[1]
    assert abs(R.item() - ref.item()) < 1e-3 * abs(ref.item())
    R.backward()
    assert torch.isfinite(Zb.grad.float()).all()


def test_coding_rate_rewards_spread_features():
    # the regulariser prefers spread features to collapsed ones: this is what prevents collapse
    spread = unit(64, 16, seed=8)
    collapsed = unit(1, 16, seed=9).expand(64, 16)
    assert coding_rate(spread, 0.5) > coding_rate(collapsed, 0.5) + 5


def test_gradient_flows_to_student_features_only():
    zsg, zsl = unit(2, 8, 6, seed=1).requires_grad_(), unit(3, 8, 6, seed=2).requires_grad_()
    ztg = unit(2, 8, 6, seed=3)
    loss, _, _ = simdino_loss(zsg, zsl, ztg, 0.5, 0.1, 4)
    loss.backward()
    assert zsg.grad.abs().sum() > 0 and zsl.grad.abs().sum() > 0
    # the distance pulls a local view towards the mean of the teacher's global views
    zsl2 = zsl.detach().clone().requires_grad_()
    simdino_loss(zsg.detach(), zsl2, ztg, 0.5, 0.0, 4, distance="half_sq")[0].backward()
    expected = (zsl2.detach().unsqueeze(1) - ztg.unsqueeze(0)).sum(1) / (5 * 2 - 2) / 8
    torch.testing.assert_close(zsl2.grad, expected)
