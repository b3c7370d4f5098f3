"""Position-embedding interpolation against hand transcriptions of the released formulas.

DINO (and SimDINO, which copies it) resizes the stored grid with bicubic `F.interpolate` and
`scale_factor = (target + 0.1) / stored`; DINOv2 makes the offset (`interpolate_offset`) and
anti-aliasing (`interpolate_antialias`) settings, and uses `size=` when the offset is 0. The
transcriptions below follow each release's own steps (its argument order, its float32 cast);
vit.py must give the same position embeddings and the same features, in float64, at grids
other than the stored one.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vit

STORED = 14           # stored grid: img_size 112 with patch 8, as DINOv2 stores 518 px with patch 14 (37 x 37)
PATCH = 8
SIZES = [(48, 48), (80, 80), (160, 160), (48, 80), (120, 56)]     # 6, 10, 20, 6x10, 15x7 patches


def dino_released(pos_embed, n_tokens, rows_px, cols_px, patch):
    """DINO's VisionTransformer.interpolate_pos_encoding, step by step. The release names the image's
    height `w` and its width `h` (it unpacks B, nc, w, h = x.shape); kept here as rows / cols."""
    N = pos_embed.shape[1] - 1
    if n_tokens - 1 == N and rows_px == cols_px:
        return pos_embed
    dim = pos_embed.shape[-1]
    side = math.sqrt(N)
    rows0, cols0 = rows_px // patch + 0.1, cols_px // patch + 0.1      # the release's +0.1 against rounding down
    grid = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(rows0 / side, cols0 / side), mode="bicubic")
    assert grid.shape[-2:] == (int(rows0), int(cols0))
    return torch.cat((pos_embed[:, 0].unsqueeze(0), grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def dinov2_released(pos_embed, n_tokens, rows_px, cols_px, patch, offset, antialias):
    """DINOv2's DinoVisionTransformer.interpolate_pos_encoding, step by step: float32 inside, cast back."""
    out_dtype = pos_embed.dtype
    N = pos_embed.shape[1] - 1
    if n_tokens - 1 == N and rows_px == cols_px:
        return pos_embed
    pe = pos_embed.float()
    dim = pe.shape[-1]
    rows0, cols0 = rows_px // patch, cols_px // patch
    M = int(math.sqrt(N))
    if offset:
        how = {"scale_factor": (float(rows0 + offset) / M, float(cols0 + offset) / M)}
    else:
        how = {"size": (rows0, cols0)}
    grid = F.interpolate(pe[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                         antialias=antialias, **how)
    assert grid.shape[-2:] == (rows0, cols0)
    out = torch.cat((pe[:, 0].unsqueeze(0), grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)
    return out.to(out_dtype)


FAMILIES = {  # family: (vit.py settings, transcription)
    "dino": ((0.1, False), lambda pe, n, r, c: dino_released(pe, n, r, c, PATCH)),
    "dinov2_default": ((0.1, False), lambda pe, n, r, c: dinov2_released(pe, n, r, c, PATCH, 0.1, False)),
    "dinov2_reg_simdinov2": ((0.0, True), lambda pe, n, r, c: dinov2_released(pe, n, r, c, PATCH, 0.0, True)),
}


def model64(offset, antialias, registers=0):
    torch.manual_seed(0)
    m = vit.vit_tiny(patch_size=PATCH, img_size=STORED * PATCH, num_register_tokens=registers, layerscale=0.1,
                     interpolate_offset=offset, interpolate_antialias=antialias).double().eval()
    with torch.no_grad():
        # float32 numbers at the init's scale: DINOv2 resizes in float32 whatever the model's dtype, so its
        # float64 output carries float32 rounding, far below 1e-6 from float32-exact inputs of this size
        m.pos_embed.copy_(m.pos_embed.float().double())
    return m


def features_with(m, x, pos):
    """The ViT's forward with the given position embeddings (the release's prepare_tokens order)."""
    B = x.shape[0]
    t = torch.cat([m.cls_token.expand(B, -1, -1), m.patch_embed(x)], dim=1) + pos
    if m.register_tokens is not None:
        t = torch.cat([t[:, :1], m.register_tokens.expand(B, -1, -1), t[:, 1:]], dim=1)
    for blk in m.blocks:
        t = blk(t)
    return m.norm(t)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_position_embeddings_and_features_equal_the_released_formula(family):
    (offset, antialias), released = FAMILIES[family]
    m = model64(offset, antialias, registers=4 if family == "dinov2_reg_simdinov2" else 0)
    for rows, cols in SIZES:
        n_tokens = 1 + (rows // PATCH) * (cols // PATCH)
        ref = released(m.pos_embed, n_tokens, rows, cols)
        ours = m.interpolate_pos_encoding(rows // PATCH, cols // PATCH)
        assert ours.dtype == torch.float64 and ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-6, (family, rows, cols)
        x = torch.randn(2, 3, rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(rows + cols))
        out = m.forward_features(x)
        with torch.no_grad():
            t = features_with(m, x, ref)
        r = 1 + m.num_register_tokens
        assert (out["cls"] - t[:, 0]).abs().max().item() < 1e-6
        assert (out["patches"] - t[:, r:]).abs().max().item() < 1e-6
    # the stored grid is used as is
    assert m.interpolate_pos_encoding(STORED, STORED) is m.pos_embed


def test_the_two_forms_really_differ():
    """What the fidelity is about: the size= form (this project's old one) and the +0.1 scale_factor form
    give other position embeddings at every non-native grid (by a sizeable fraction of their spread), and
    anti-aliasing changes them again (PyTorch's anti-aliased bicubic is another kernel, up or down)."""
    m = model64(0.1, False)
    spread = m.pos_embed[:, 1:].std().item()
    for g in (6, 10, 20):
        dino = m.interpolate_pos_encoding(g, g)
        size_form = vit.resize_pos_embed(m.pos_embed, g, g, 0.0, False)
        anti_aliased = vit.resize_pos_embed(m.pos_embed, g, g, 0.0, True)
        assert (dino - size_form)[:, 1:].abs().max().item() > 0.1 * spread, g
        assert (size_form - anti_aliased)[:, 1:].abs().max().item() > 0.1 * spread, g


def test_an_offset_that_changes_the_grid_is_refused():
    m = model64(1.5, False)
    with pytest.raises(ValueError, match="interpolate_offset"):
        m.interpolate_pos_encoding(6, 6)


def test_bf16_position_embeddings_are_resized_in_float32():
    m = model64(0.0, True).bfloat16()
    ref = dinov2_released(m.pos_embed, 1 + 36, 48, 48, PATCH, 0.0, True)
    ours = m.interpolate_pos_encoding(6, 6)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)


# ----------------------------------------------------------------------------- checkpoints pick their own form

def released_like_checkpoint(offset, antialias, registers, layerscale, wrap, grid=STORED):
    """A backbone state dict in a released layout; wrap puts it where that release keeps it."""
    torch.manual_seed(1)
    m = vit.vit_tiny(patch_size=PATCH, img_size=grid * PATCH, num_register_tokens=registers,
                     layerscale=layerscale, interpolate_offset=offset, interpolate_antialias=antialias).double()
    return m, wrap({k: v for k, v in m.state_dict().items() if k != "mask_token"})


LAYOUTS = {  # layout: (the form its code uses, registers, layerscale, how the file holds the backbone)
    "dino_or_simdino": ((0.1, False), 0, None,
                        lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "args": None}),
    "dinov2_hub": ((0.1, False), 0, 1e-5, lambda sd: sd),
    "dinov2_reg_hub": ((0.0, True), 4, 1e-5, lambda sd: sd),
    "simdinov2_teacher": ((0.0, True), 4, 0.1, lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()}}),
    "this_project_v1": ((0.1, False), 0, None,
                        lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                                    "args": {"interpolate_offset": 0.1, "interpolate_antialias": False}}),
    "this_project_v2": ((0.0, True), 4, 0.1,
                        lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                                    "args": {"interpolate_offset": 0.0, "interpolate_antialias": True}}),
    "this_project_before_the_settings": ((0.0, False), 0, None,   # resized by size= then
                                         lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                                                     "args": {"seed": 0}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vit_from_checkpoint_uses_the_checkpoints_own_interpolation(layout):
    (offset, antialias), registers, ls, wrap = LAYOUTS[layout]
    if layout == "dino_or_simdino":      # DINO keeps its args as an argparse.Namespace
        import argparse
        wrap_ns = wrap
        wrap = lambda sd: {**wrap_ns(sd), "args": argparse.Namespace(arch="vit_tiny")}
    src, ckpt = released_like_checkpoint(offset, antialias, registers, ls, wrap)
    m = vit.vit_from_checkpoint(ckpt)
    assert (m.interpolate_offset, m.interpolate_antialias) == (offset, antialias)
    transcription = (lambda pe, n, r, c: dino_released(pe, n, r, c, PATCH)) if offset and not antialias else \
        (lambda pe, n, r, c: dinov2_released(pe, n, r, c, PATCH, offset, antialias))
    if layout == "this_project_before_the_settings":
        transcription = lambda pe, n, r, c: dinov2_released(pe, n, r, c, PATCH, 0.0, False)
    ref = transcription(src.pos_embed, 1 + 100, 80, 80)
    assert (m.interpolate_pos_encoding(10, 10) - ref).abs().max().item() < 1e-6
    # an explicit setting wins
    other = vit.vit_from_checkpoint(ckpt, interpolate_offset=0.0 if offset else 0.1, interpolate_antialias=not antialias)
    assert (other.interpolate_offset, other.interpolate_antialias) == (0.0 if offset else 0.1, not antialias)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True)])
def test_loading_into_another_grid_gives_the_released_run_time_interpolation(offset, antialias):
    """A checkpoint stored at a large grid (DINOv2: 37 x 37 at 518 px) loaded into a model built for a smaller
    one: at that model's own size the position embeddings are what the release interpolates at run time."""
    src, sd = released_like_checkpoint(offset, antialias, 0, None, lambda sd: sd, grid=STORED)
    small = vit.vit_tiny(patch_size=PATCH, img_size=6 * PATCH, interpolate_offset=offset,
                         interpolate_antialias=antialias).double()
    vit.load_state_dict(small, sd)
    ref = dinov2_released(src.pos_embed, 1 + 36, 48, 48, PATCH, offset, antialias)
    assert (small.interpolate_pos_encoding(6, 6) - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("script", ["eval_knn", "eval_linear"])
def test_evaluation_scripts_use_the_checkpoints_form_unless_told(script, tmp_path):
    import eval_knn
    module = pytest.importorskip(script)
    _, ckpt = released_like_checkpoint(0.0, True, 4, 1e-5, lambda sd: sd)       # a DINOv2 register model
    torch.save(ckpt, tmp_path / "reg.pth")
    path = str(tmp_path / "reg.pth")
    args = module.get_args(["--checkpoint", path])
    m, _ = eval_knn.load_backbone(path, "teacher", args.interpolate_offset, args.interpolate_antialias)
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.0, True)
    args = module.get_args(["--checkpoint", path, "--interpolate_offset", "0.1", "--no-interpolate_antialias"])
    m, _ = eval_knn.load_backbone(path, "teacher", args.interpolate_offset, args.interpolate_antialias)
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.1, False)
    assert (eval_knn.random_twin(m, 0).interpolate_offset, eval_knn.random_twin(m, 0).interpolate_antialias) == (0.1, False)


@pytest.mark.parametrize("method,form", [("simdino", (0.1, False)), ("dino", (0.1, False)),
                                         ("simdinov2", (0.0, True)), ("dinov2", (0.0, True))])
def test_each_method_trains_with_its_familys_released_form(method, form):
    script = pytest.importorskip(method)
    argv = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--proj_hidden_dim", "32",
            "--proj_dim", "8"] + (["--out_dim", "32"] if method.startswith("dino") else [])
    args = script.get_args(argv)
    student, teacher = script.build_networks(args)
    for net in (student, teacher):
        assert (net.backbone.interpolate_offset, net.backbone.interpolate_antialias) == form
    flipped = script.get_args(argv + ["--interpolate_offset", str(0.1 - form[0]),
                                      "--interpolate_antialias" if not form[1] else "--no-interpolate_antialias"])
    assert (flipped.interpolate_offset, flipped.interpolate_antialias) == (0.1 - form[0], not form[1])
