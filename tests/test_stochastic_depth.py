"""DINOv2's stochastic depth (vit.py, drop_path_mode="dinov2", which simdinov2.py and dinov2.py set) against a
transcription of the released functions, draw for draw; the kept count, the expectation, the gradients; DINO's
per-sample form left as it was."""
import pytest
import torch

import vit

DIM, HEADS = 32, 4


def block(p, mode="dinov2", layerscale=0.1):
    torch.manual_seed(0)
    blk = vit.Block(DIM, HEADS, drop_path=p, layerscale=layerscale, drop_path_mode=mode).double().train()
    for ls in (blk.ls1, blk.ls2):               # layerscales that differ per channel, so a misplaced one shows
        ls.gamma.data.uniform_(0.5, 1.5)
    return blk


# ---- a transcription of the released code (dinov2/layers/block.py and drop_path.py), step by step

def released_subset_size_and_scale(b, ratio):
    size = max(int(b * (1 - ratio)), 1)
    return size, b / size


def released_single(x, residual_func, ratio):
    """drop_add_residual_stochastic_depth: the randperm, the branch on the subset, index_add with b / subset."""
    b = x.shape[0]
    size, scale = released_subset_size_and_scale(b, ratio)
    brange = torch.randperm(b, device=x.device)[:size]
    residual = residual_func(x[brange]).flatten(1)
    return torch.index_add(x.flatten(1), 0, brange, residual.to(dtype=x.dtype), alpha=scale).view_as(x)


def released_list(x_list, residual_func, ratio, scaling_vector):
    """drop_add_residual_stochastic_depth_list: every tensor's subset drawn first, then the branch (without the
    layerscale) on each subset, then index_add of scaling_vector * residual (the non-xFormers scaled_index_add)."""
    drawn = []
    for x in x_list:
        size, scale = released_subset_size_and_scale(x.shape[0], ratio)
        drawn.append((torch.randperm(x.shape[0], device=x.device)[:size], scale))
    residuals = [residual_func(x[brange]) for x, (brange, _) in zip(x_list, drawn)]   # xFormers: one nested call
    return [torch.index_add(x, 0, brange, scaling_vector * r.to(dtype=x.dtype), alpha=scale)
            for x, (brange, scale), r in zip(x_list, drawn, residuals)]


def released_drop_path(x, drop_prob):
    keep_prob = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * random_tensor.div_(keep_prob)


def released_block(blk, x, p):
    """Block.forward (a tensor) or NestedTensorBlock.forward_nested (a list) of the release, in training."""
    def attn_func(t):
        return blk.attn(blk.norm1(t))

    def ffn_func(t):
        return blk.mlp(blk.norm2(t))

    if isinstance(x, list):                                             # any rate above 0
        x = released_list(x, attn_func, p, blk.ls1.gamma)
        return released_list(x, ffn_func, p, blk.ls2.gamma)
    if p > 0.1:
        x = released_single(x, lambda t: blk.ls1(attn_func(t)), p)
        return released_single(x, lambda t: blk.ls2(ffn_func(t)), p)
    x = x + released_drop_path(blk.ls1(attn_func(x)), p)
    return x + released_drop_path(blk.ls2(ffn_func(x)), p)


# ---- the tests

@pytest.mark.parametrize("p", [0.3, 0.1, 0.05, 0.5])
def test_block_equals_the_released_functions_draw_for_draw(p):
    blk = block(p)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, DIM, generator=g, dtype=torch.float64)
    xs = [x, torch.randn(7, 3, DIM, generator=g, dtype=torch.float64)]       # two crop sizes, as in training
    for seed in range(3):
        torch.manual_seed(seed)
        ours = blk(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, released_block(blk, x, p), rtol=1e-12, atol=1e-12)
        torch.manual_seed(seed)
        ours = blk(xs)
        torch.manual_seed(seed)
        for a, b in zip(ours, released_block(blk, xs, p)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    assert not torch.equal(blk(x), blk.eval()(x))                       # the draws did drop something


def kept_counts(blk, x):
    """Samples each branch computes on, per call: [(attention batch, MLP batch), ...] in call order."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for m in (blk.attn, blk.mlp)]
    blk(x)
    for h in hooks:
        h.remove()
    return seen


def test_the_kept_count_is_exact_and_the_dropped_are_not_computed():
    for b, p in [(10, 0.3), (7, 0.3), (64, 0.3), (6, 0.99), (128, 0.4), (5, 0.05)]:
        k = max(int(b * (1 - p)), 1)
        x = torch.randn(b, 3, DIM, dtype=torch.float64)
        assert kept_counts(block(p), [x]) == [k, k]
        kept = vit.subset_residual(torch.zeros(b, 2, 3), torch.ones_like, p)  # branch of ones: rows that got it
        assert (kept != 0).all((1, 2)).sum() == k and (kept == 0).all((1, 2)).sum() == b - k
        torch.testing.assert_close(kept[kept != 0], torch.full((k * 6,), b / k))
    x = torch.randn(10, 3, DIM, dtype=torch.float64)
    assert kept_counts(block(0.3), [x, x[:6]]) == [7, 4, 7, 4]        # per crop-size tensor: attention, then MLP
    assert kept_counts(block(0.3), x) == [7, 7]
    assert kept_counts(block(0.05), x) == [10, 10]                    # one batch at <= 0.1: per-sample Bernoulli
    assert kept_counts(block(0.3, mode="dino"), [x]) == [10, 10]      # DINO's form computes every sample
    assert kept_counts(block(0.3).eval(), [x]) == [10, 10]            # not training (the teacher): no drop


def test_the_expectation_over_draws_is_the_undropped_output():
    # b = 6, p = 0.3: 4 kept, scaled by 6/4 = 1.5 (DINOv2's b / subset), where 1 / (1 - p) = 1.43 would miss by 5%
    blk = block(0.3)
    x = torch.randn(6, 3, DIM, dtype=torch.float64)
    with torch.no_grad():
        branch = blk.attn_branch(x)                                     # (6, 3, D) undropped
        n = 20000
        mean = sum(vit.subset_residual(x, blk.attn_branch, 0.3) for _ in range(n)) / n
    # each sample's branch is kept with frequency ~ Binomial(n, 2/3) / n, sd sqrt(2/9/n) = 0.0033: bound at 5 sd
    assert ((mean - x) / branch - 1).abs().max() < 5 * 1.5 * (2 / 9 / n) ** 0.5
    m = vit.vit_tiny(patch_size=8, img_size=16, drop_path_rate=0.3, drop_path_uniform=True, layerscale=0.1,
                     drop_path_mode="dinov2").eval()
    img = torch.randn(2, 3, 16, 16)
    reference = vit.vit_tiny(patch_size=8, img_size=16, layerscale=0.1)
    reference.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(img), reference.eval()(img))            # the teacher's forward: nothing dropped


def test_gradients_flow_only_through_the_kept_samples_branches():
    blk = block(0.3)
    x = torch.randn(10, 5, DIM, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 5, DIM, dtype=torch.float64)
    torch.manual_seed(3)
    (vit.subset_residual(x, blk.attn_branch, 0.3) * w).sum().backward()
    torch.manual_seed(3)
    keep = torch.randperm(10)[:7]                                       # the subset it drew
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[keep] = False
    assert torch.equal(x.grad[dropped], w[dropped])                    # the identity path alone
    assert not torch.allclose(x.grad[keep], w[keep])
    ours = {n: p.grad.clone() for n, p in blk.named_parameters() if p.grad is not None}
    blk.zero_grad()
    (10 / 7 * blk.attn_branch(x.detach()[keep]) * w[keep]).sum().backward()   # the kept samples' branch alone
    assert ours.keys() == {n for n, p in blk.named_parameters() if p.grad is not None}
    for n, g in ours.items():
        torch.testing.assert_close(g, blk.get_parameter(n).grad, rtol=1e-10, atol=1e-12, msg=n)


def test_models_take_the_mode_and_dino_keeps_its_form():
    m = vit.vit_tiny(patch_size=8, img_size=16, drop_path_rate=0.3, drop_path_mode="dinov2")
    assert {b.drop_path_mode for b in m.blocks} == {"dinov2"}
    assert [b.drop_rate for b in m.blocks] == pytest.approx([b.drop_prob.item() for b in m.blocks])
    assert {b.drop_path_mode for b in vit.vit_tiny(drop_path_rate=0.1).blocks} == {"dino"}   # the default
    with pytest.raises(ValueError, match="drop_path_mode 'timm'"):
        vit.vit_tiny(drop_path_mode="timm")
    blk = block(0.3, mode="dino")           # DINO's form: one torch.rand per branch, x * keep / (1 - p)
    x = torch.randn(10, 5, DIM, dtype=torch.float64)
    torch.manual_seed(4)
    ours = blk(x)
    torch.manual_seed(4)
    p = blk.drop_prob                       # 0.3 rounded to float32, as the buffer holds it
    x1 = x + blk.ls1(blk.attn(blk.norm1(x))) * (torch.rand(10, 1, 1) >= p) / (1 - p)
    x2 = x1 + blk.ls2(blk.mlp(blk.norm2(x1))) * (torch.rand(10, 1, 1) >= p) / (1 - p)
    torch.testing.assert_close(ours, x2, rtol=1e-12, atol=1e-12)


def test_the_v2_students_take_dinov2s_form_and_the_v1_students_dinos():
    import dino, dinov2, simdino, simdinov2
    tiny = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8"]
    for method, mode in ((simdinov2, "dinov2"), (dinov2, "dinov2"), (simdino, "dino"), (dino, "dino")):
        own = ["--out_dim", "16"] if method in (dino, dinov2) else []
        student, teacher = method.build_networks(method.get_args(tiny + own))
        assert {b.drop_path_mode for b in student.backbone.blocks} == {mode}, method.__name__
        assert not teacher.training and student.training
    args = simdinov2.get_args(tiny + ["--drop_path_mode", "dino"])
    assert {b.drop_path_mode for b in simdinov2.build_networks(args)[0].backbone.blocks} == {"dino"}
