import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import vit


def tiny(**kw):
    kw.setdefault("patch_size", 8)
    kw.setdefault("img_size", 32)
    return vit.vit_tiny(**kw).eval()


def test_sizes():
    with torch.device("meta"):
        for name, (dim, depth, heads) in {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
                                          "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}.items():
            m = getattr(vit, name)(patch_size=14)
            assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (dim, depth, heads)
            assert m.blocks[0].mlp.fc1.out_features == 4 * dim
            assert m.blocks[0].attn.qkv.bias is not None
            assert m.patch_embed.proj.kernel_size == (14, 14)


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(0)
    attn = vit.Attention(48, num_heads=4)
    x = torch.randn(3, 10, 48)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 4, C // 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // 4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", [F.scaled_dot_product_attention, vit.explicit_attention], ids=["sdpa", "explicit"])
def test_every_attention_formulation_is_exact(form, dtype):
    """Both formulations vit.attention uses (the fused kernels; the explicit one, for bf16 on a CPU) give
    softmax(q k^T / sqrt(d)) v and its gradients as float64 computes them, to 1e-6 of each tensor's norm (float32
    rounds to 6e-8), at the token counts of this project's crops (5 to 257), scores of std 2 (peaked rows)."""
    g = torch.Generator().manual_seed(0)
    for n in (5, 17, 65, 257):
        q, k, v, dy = (torch.randn(2, 3, n, 64, generator=g, dtype=torch.float64) for _ in range(4))
        q = 2 * q
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        y_ref = torch.softmax(ref[0] @ ref[1].mT / 8, dim=-1) @ ref[2]
        y_ref.backward(dy)
        low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        y = form(*low)
        y.backward(dy.to(dtype))
        assert y.dtype == dtype
        for a, b in zip([y, *(t.grad for t in low)], [y_ref.detach(), *(t.grad for t in ref)]):
            assert (a.double() - b).norm() <= 1e-6 * b.norm(), f"{n} tokens"


def test_attention_is_fused_except_in_bf16_on_a_cpu(monkeypatch):
    """The rule of vit.attention: the explicit formulation for bf16 on a CPU only (docs/precision.md)."""
    used = []
    monkeypatch.setattr(vit, "explicit_attention", lambda q, k, v: used.append(q.dtype) or q)
    q = torch.randn(2, 3, 17, 64)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        vit.attention(q.to(dtype), q.to(dtype), q.to(dtype))
    assert used == [torch.bfloat16]


def test_layer_norm_runs_in_float32_for_bf16_weights():
    """Under FSDP2's bf16 parameters the float32 residual stream is normalised with float32 weights, as CUDA's
    autocast does it: the output equals the float32 layer's, and bf16 inputs give float32 outputs too."""
    norm = vit.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    x = torch.randn(4, 16)
    expected = norm(x)
    low = vit.LayerNorm(16, eps=1e-6).bfloat16()
    low.load_state_dict(norm.state_dict())
    ref = torch.nn.functional.layer_norm(x, (16,), low.weight.float(), low.bias.float(), 1e-6)
    torch.testing.assert_close(low(x), ref, rtol=0, atol=0)
    assert low(x).dtype == torch.float32 and low(x.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(low(x), expected, rtol=0, atol=1e-2)      # only the weights' bf16 rounding


def test_outputs_and_registers():
    m = tiny(num_register_tokens=4)
    x = torch.randn(2, 3, 32, 32)
    out = m.forward_features(x)
    assert out["cls"].shape == (2, 192) and out["registers"].shape == (2, 4, 192) and out["patches"].shape == (2, 16, 192)
    torch.testing.assert_close(m(x), out["cls"])
    # final norm applied: each token has ~zero mean and unit variance before the affine (identity at init)
    tok = out["patches"][0, 0]
    assert abs(tok.mean().item()) < 1e-4 and abs(tok.var(unbiased=False).item() - 1) < 1e-2
    last = m.get_intermediate_layers(x, n=2)
    assert len(last) == 2 and last[0].shape == (2, 1 + 4 + 16, 192)
    torch.testing.assert_close(last[-1][:, 0], out["cls"])


def test_registers_carry_no_position_and_sit_after_cls():
    m = tiny(num_register_tokens=2)
    x = torch.randn(1, 3, 32, 32)
    tokens = m.prepare_tokens(x)                                        # (1, 1 + 2 + 16, D)
    torch.testing.assert_close(tokens[0, 1:3], m.register_tokens[0])
    torch.testing.assert_close(tokens[0, 0], m.cls_token[0, 0] + m.pos_embed[0, 0])


def test_pos_embed_interpolation():
    m = tiny()                                                          # stored grid 4x4
    assert m.interpolate_pos_encoding(4, 4) is m.pos_embed
    with torch.no_grad():                                               # a constant field stays constant
        m.pos_embed.copy_(torch.full_like(m.pos_embed, 0.5))
        m.pos_embed[:, 0] = -1.0
    pe = m.interpolate_pos_encoding(2, 6)
    assert pe.shape == (1, 1 + 12, 192)
    torch.testing.assert_close(pe[0, 0], torch.full((192,), -1.0))
    torch.testing.assert_close(pe[0, 1:], torch.full((12, 192), 0.5))
    # one model runs 32 px and 16 px crops; 12 px is refused with a clear message
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 192)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        m(torch.randn(1, 3, 12, 16))


def test_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    m = tiny()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    t, t0 = m.prepare_tokens(x, masks), m.prepare_tokens(x)
    pos = m.pos_embed[0, 1:]
    torch.testing.assert_close(t[0, 1 + 1], m.mask_token[0] + pos[1])
    torch.testing.assert_close(t[0, 1 + 5], m.mask_token[0] + pos[5])
    torch.testing.assert_close(t[1], t0[1])                             # unmasked image untouched
    torch.testing.assert_close(t[0, 1 + 2], t0[0, 1 + 2])
    assert not torch.allclose(m(x, masks)[0], m(x)[0])


def test_drop_path_and_layerscale():
    m = tiny(drop_path_rate=0.5, layerscale=0.1)
    assert [b.drop_prob.item() for b in m.blocks][::11] == [0.0, 0.5]   # linear over depth
    assert {round(b.drop_prob.item(), 6) for b in tiny(drop_path_rate=0.3, drop_path_uniform=True).blocks} == {0.3}
    torch.testing.assert_close(m.blocks[3].ls1.gamma, torch.full((192,), 0.1))
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(m(x), m(x))                              # eval: deterministic
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(y1, m(x))


@pytest.mark.parametrize("mode", ["dino", "dinov2"])
def test_grad_checkpointing_gives_the_same_gradients_and_recomputes_each_block(monkeypatch, mode):
    # float64, drop path and layerscale on, masks and registers: the recompute must replay the same drop path
    # (DINOv2's form: the same subsets, one batch and a list of two crop sizes, rates above and below 0.1)
    m = tiny(drop_path_rate=0.5, layerscale=0.1, num_register_tokens=2, drop_path_mode=mode).double().train()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    xl = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    masks = torch.rand(6, 16) < 0.3
    calls, block_forward = [], vit.Block.forward
    monkeypatch.setattr(vit.Block, "forward", lambda blk, x: calls.append(1) or block_forward(blk, x))

    def grads(checkpointing):
        m.grad_checkpointing = checkpointing
        m.zero_grad()
        calls.clear()
        torch.manual_seed(0)
        out = m.forward_features(x, masks)
        local = m.forward_features_list([x, xl], [masks, None])[1]
        (out["cls"].square().sum() + out["patches"].sin().sum() + local["patches"].cos().sum()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}, len(calls)

    plain, n_plain = grads(False)
    ckpt, n_ckpt = grads(True)
    assert (n_plain, n_ckpt) == (24, 48)                                   # every block ran again in backward
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-12, atol=1e-12, msg=n)
    assert any(plain[n].abs().sum() > 0 for n in plain if n.startswith("blocks.11"))
    m.eval()                                                                # not training: no checkpoint, no recompute
    calls.clear()
    m.forward_features(x).__getitem__("cls").sum().backward()
    assert len(calls) == 12
    assert vit.vit_tiny(grad_checkpointing=True).grad_checkpointing


# ----------------------------------------------------------------------------- released checkpoint layouts

def released_vit_state_dict(dim, depth, patch, grid, registers=0, layerscale=False, mask_token=False):
    """A state dict with the key names and shapes of the DINO / DINOv2 ViT releases, random values."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    if mask_token:
        shapes["mask_token"] = (1, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
        if layerscale:
            shapes.update({b + "ls1.gamma": (dim,), b + "ls2.gamma": (dim,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def assert_loaded(model, sd):
    own = model.state_dict()
    for k in ("cls_token", "blocks.11.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "patch_embed.proj.weight"):
        torch.testing.assert_close(own[k], sd[k])


def test_load_dino_backbone_and_full_checkpoint(tmp_path):
    sd = released_vit_state_dict(192, 12, 16, 14)                      # dino_deit{tiny}16_pretrain.pth layout
    m = vit.load_checkpoint(vit.vit_tiny(patch_size=16), sd)
    assert_loaded(m, sd)
    full = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(2048, 192),
                        "head.last_layer.weight_g": torch.ones(65536, 1)},
            "student": {f"module.backbone.{k}": -v for k, v in sd.items()},
            "epoch": 100, "dino_loss": {"center": torch.zeros(1, 65536)}, "args": argparse.Namespace(arch="vit_tiny")}
    assert_loaded(vit.load_checkpoint(vit.vit_tiny(patch_size=16), full), sd)
    torch.save(full, tmp_path / "dino_full_checkpoint.pth")                    # DINO keeps its args as a Namespace
    assert_loaded(vit.vit_from_checkpoint(str(tmp_path / "dino_full_checkpoint.pth")), sd)
    student = vit.load_checkpoint(vit.vit_tiny(patch_size=16), full, which="student")
    torch.testing.assert_close(student.cls_token, -sd["cls_token"])
    inferred = vit.vit_from_checkpoint(full)
    assert (inferred.embed_dim, inferred.patch_size, inferred.num_register_tokens) == (192, 16, 0)
    assert_loaded(inferred, sd)


def test_load_dinov2_hub_with_registers_and_other_resolution():
    sd = released_vit_state_dict(384, 12, 14, 37, registers=4, layerscale=True, mask_token=True)  # vits14_reg4, 518 px
    m = vit.vit_from_checkpoint(sd)
    assert (m.embed_dim, m.patch_size, m.num_register_tokens) == (384, 14, 4)
    assert_loaded(m, sd)
    torch.testing.assert_close(m.blocks[5].ls2.gamma, sd["blocks.5.ls2.gamma"])
    torch.testing.assert_close(m.mask_token, sd["mask_token"])
    # into a 224 px model: the 37x37 position grid is resized to 16x16
    m224 = vit.load_checkpoint(vit.vit_small(patch_size=14, num_register_tokens=4, layerscale=1e-5), sd)
    assert m224.pos_embed.shape == (1, 257, 384)
    torch.testing.assert_close(m224.pos_embed[:, 0], sd["pos_embed"][:, 0])
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(m224.eval()(x), m.eval()(x), rtol=1e-4, atol=1e-4)  # same features at 224 px


def test_load_dinov2_training_checkpoint_with_block_chunks():
    sd = released_vit_state_dict(384, 12, 16, 14, registers=4, layerscale=True, mask_token=True)
    chunked = {}
    for k, v in sd.items():   # DINOv2 FSDP chunks: blocks.<chunk>.<i>. with 4 chunks of 3 blocks
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]
        chunked[f"backbone.{k}"] = v
    ckpt = {"teacher": {**chunked, "dino_head.mlp.0.weight": torch.zeros(2048, 384),
                        "ibot_head.mlp.0.weight": torch.zeros(2048, 384)}, "iteration": 5}
    m = vit.vit_from_checkpoint(ckpt)
    assert len(m.blocks) == 12 and m.num_register_tokens == 4
    assert_loaded(m, sd)


def test_load_own_checkpoint_file(tmp_path):
    torch.manual_seed(0)
    src = tiny(num_register_tokens=2)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "args": {"arch": "vit_tiny"}}, path)
    m = vit.vit_from_checkpoint(str(path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.eval()(x), src(x))


def test_wrong_architecture_and_bad_files(tmp_path):
    sd = released_vit_state_dict(384, 12, 16, 14)
    with pytest.raises(vit.CheckpointError, match=r"shape .*cls_token \(1, 1, 384\) vs \(1, 1, 768\)"):
        vit.load_checkpoint(vit.vit_base(patch_size=16), sd)
    with pytest.raises(vit.CheckpointError, match=r"missing \['register_tokens'\]"):
        vit.load_checkpoint(vit.vit_small(patch_size=16, num_register_tokens=4), sd)
    with pytest.raises(vit.CheckpointError, match="ls1.gamma"):
        vit.load_checkpoint(vit.vit_small(patch_size=16, layerscale=0.1), sd)
    with pytest.raises(vit.CheckpointError, match="does not exist"):
        vit.vit_from_checkpoint(str(tmp_path / "nope.pth"))
    torch.save({"teacher": sd, "hook": print}, tmp_path / "code.pth")          # a pickled callable is not run
    with pytest.raises(vit.CheckpointError, match="beyond tensors"):
        vit.vit_from_checkpoint(str(tmp_path / "code.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(vit.CheckpointError, match="could not be read"):
        vit.vit_from_checkpoint(str(tmp_path / "junk.pth"))
    with pytest.raises(vit.CheckpointError, match="holds a Tensor, not a state dict"):
        vit.vit_from_checkpoint(torch.zeros(3))
    with pytest.raises(vit.CheckpointError, match="holds no 'student' network, only teacher"):
        vit.load_checkpoint(vit.vit_small(patch_size=16), {"teacher": sd}, which="student")
    with pytest.raises(vit.CheckpointError, match="holds no ViT backbone"):
        vit.vit_from_checkpoint({"teacher": {"head.mlp.0.weight": torch.zeros(2, 2)}})


# ----------------------------------------------------------------------------- the releases' training checkpoints

class MultiCropWrapper(torch.nn.Module):
    """DINO's student / teacher: backbone + head, so the state dict reads backbone.* and head.*."""
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


def release_training_checkpoint(path, registers=0, **save_kwargs):
    """A checkpoint saved the way DINO's main_dino.py (and the SimDINO release's scripts, which keep its code) save
    theirs: lr and weight decay set from numpy schedule arrays each iteration, then one step; the args Namespace."""
    import numpy as np
    torch.manual_seed(0)
    student = MultiCropWrapper(vit.vit_tiny(patch_size=16, img_size=32, num_register_tokens=registers),
                               torch.nn.Linear(192, 8))
    teacher = MultiCropWrapper(vit.vit_tiny(patch_size=16, img_size=32, num_register_tokens=registers),
                               torch.nn.Linear(192, 8))
    regularized = [p for n, p in student.named_parameters() if not n.endswith(".bias") and p.ndim > 1]
    not_regularized = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    lr_schedule = np.linspace(0.0, 5e-4, 10)                                       # DINO's cosine_scheduler arrays
    wd_schedule = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * np.arange(10) / 10))
    for i, param_group in enumerate(optimizer.param_groups):                       # main_dino.py, train_one_epoch
        param_group["lr"] = lr_schedule[3]
        if i == 0:
            param_group["weight_decay"] = wd_schedule[3]
    student(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    args = argparse.Namespace(arch="vit_tiny", patch_size=16, lr=0.0005, weight_decay=0.04, out_dim=8, seed=0,
                              global_crops_scale=(0.4, 1.0), output_dir=".")
    ckpt = {"student": {f"module.{k}": v for k, v in student.state_dict().items()},   # DDP-wrapped
            "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4, "args": args,
            "dino_loss": {"center": torch.randn(1, 8)}}
    assert type(ckpt["optimizer"]["param_groups"][0]["lr"]) is np.float64
    assert type(ckpt["optimizer"]["param_groups"][0]["weight_decay"]) is np.float64
    torch.save(ckpt, path, **save_kwargs)
    return student, teacher, lr_schedule[3], wd_schedule[3]


def assert_same_weights(model, source):
    own = model.state_dict()
    for k, v in source.backbone.state_dict().items():
        if k != "mask_token":
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("registers", [0, 4])
def test_release_training_checkpoint_with_numpy_scalars_loads(tmp_path, registers):
    import numpy as np

    import eval_knn
    import eval_linear
    path = str(tmp_path / "checkpoint.pth")
    student, teacher, lr, wd = release_training_checkpoint(path, registers)
    ckpt = vit.read_checkpoint(path)                        # weights_only: numpy scalars and the Namespace come back
    groups = ckpt["optimizer"]["param_groups"]
    assert type(groups[0]["lr"]) is np.float64 and groups[0]["lr"] == lr and groups[1]["lr"] == lr
    assert type(groups[0]["weight_decay"]) is np.float64 and groups[0]["weight_decay"] == wd and wd > 0.04
    assert groups[1]["weight_decay"] == 0.0 and ckpt["epoch"] == 4 and ckpt["dino_loss"]["center"].shape == (1, 8)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].global_crops_scale == (0.4, 1.0)
    assert ckpt["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0   # a real step's Adam state

    model = vit.vit_from_checkpoint(path)
    assert (model.embed_dim, model.patch_size, model.num_register_tokens) == (192, 16, registers)
    assert_same_weights(model, teacher)
    assert_same_weights(vit.vit_from_checkpoint(path, which="student"), student)
    assert not torch.equal(teacher.backbone.cls_token, student.backbone.cls_token)
    # DINO / SimDINO / DINOv2 without registers resize by offset 0.1, register models by size with antialias
    assert (model.interpolate_offset, model.interpolate_antialias) == ((0.0, True) if registers else (0.1, False))
    knn_model, knn_args = eval_knn.load_backbone(path)
    assert_same_weights(knn_model, teacher)
    assert knn_args["arch"] == "vit_tiny" and knn_args["seed"] == 0       # the Namespace as a dict
    linear_model, _ = eval_linear.load_backbone(path, "student")
    assert_same_weights(linear_model, student)
    x = torch.randn(2, 3, 32, 32)                                           # the stored grid: no resizing
    torch.testing.assert_close(knn_model(x), teacher.backbone.eval()(x), rtol=0, atol=0)


def test_release_checkpoint_written_under_the_other_numpy_loads(tmp_path):
    """numpy 1.x pickles a scalar as numpy.core.multiarray.scalar, numpy 2.x as numpy._core.multiarray.scalar: a
    file written under one loads under the other. The legacy (non-zip) format keeps the pickle as plain bytes."""
    import numpy as np
    path = tmp_path / "legacy.pth"
    _, teacher, lr, _ = release_training_checkpoint(path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    names = [b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"]
    own = next(n for n in names if n in raw)
    other = names[1 - names.index(own)]
    path.write_bytes(raw.replace(own, other))
    assert other in path.read_bytes() and own not in path.read_bytes()
    ckpt = vit.read_checkpoint(str(path))
    group = ckpt["optimizer"]["param_groups"][0]
    assert type(group["lr"]) is np.float64 and group["lr"] == lr
    assert_same_weights(vit.vit_from_checkpoint(str(path)), teacher)


class Schedule:
    def __init__(self):
        self.values = [0.1]


def test_release_checkpoint_with_other_objects_is_still_refused(tmp_path):
    import numpy as np
    path = tmp_path / "checkpoint.pth"
    release_training_checkpoint(path)
    for name, extra in [("class", Schedule()), ("numpy array", np.arange(3.0)), ("function", print)]:
        ckpt = torch.load(path, weights_only=False)
        ckpt["optimizer"]["param_groups"][0]["scheduler"] = extra
        torch.save(ckpt, tmp_path / "other.pth")
        with pytest.raises(vit.CheckpointError, match="holds Python objects beyond tensors, which are not loaded") as e:
            vit.read_checkpoint(str(tmp_path / "other.pth"))
        assert "\n" not in str(e.value), name
