"""dino.py end to end on the embedded dataset: log, checkpoints, last-layer freezing, resume, bad input."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dino
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--local_crops_number", "2", "--proj_hidden_dim", "64", "--proj_dim", "16", "--out_dim", "32",
        "--data", "synthetic:64", "--batch_size_per_gpu", "16", "--epochs", "2", "--warmup_epochs", "1",
        "--warmup_teacher_temp_epochs", "2", "--num_workers", "0", "--log_every", "1", "--saveckp_freq", "1"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("a"))
    dino.train(dino.get_args(TINY + ["--output_dir", out]))
    return out


def test_log_and_schedules(run_a):
    log = read_log(run_a)
    assert [r["iteration"] for r in log] == list(range(8))           # 64 images / 16 = 4 it/epoch, 2 epochs
    assert all(np.isfinite(r["loss"]) for r in log)
    lr = dino.cosine_schedule(0.0005 * 16 / 256, 1e-6, 2, 4, warmup_epochs=1)
    assert [r["lr"] for r in log] == pytest.approx(list(lr))
    assert log[0]["wd"] == pytest.approx(0.04) and log[4]["wd"] > 0.2                    # cosine 0.04 -> 0.4
    assert log[0]["momentum"] == pytest.approx(0.996) and log[-1]["momentum"] > 0.999
    assert [r["teacher_temp"] for r in log] == pytest.approx([0.04] * 4 + [0.07] * 4)   # per epoch, 2-epoch warm-up
    for r in log:                                                   # the collapse diagnostic
        assert 0 <= r["teacher_entropy"] <= math.log(32) + 1e-6
        assert r["kl"] == pytest.approx(r["loss"] - r["teacher_entropy"]) and r["kl"] > -1e-5   # a KL divergence
        assert r["skipped_images"] == 0 and r["images_per_s"] > 0


def test_checkpoint_holds_a_loadable_teacher_and_the_centre(run_a):
    ckpt = torch.load(os.path.join(run_a, "checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 8 and ckpt["args"]["arch"] == "vit_tiny"
    assert ckpt["center"].shape == (1, 32) and ckpt["center"].abs().sum() > 0
    assert ckpt["teacher"]["head.last_layer.weight_v"].shape == (32, 16)
    assert os.path.exists(os.path.join(run_a, "checkpoint0001.pth"))
    teacher = vit.vit_from_checkpoint(os.path.join(run_a, "checkpoint.pth")).eval()
    _, reference = dino.build_networks(dino.get_args(TINY))
    reference.load_state_dict(ckpt["teacher"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(teacher(x), reference.backbone.eval()(x))
    s, t = ckpt["student"]["backbone.blocks.0.attn.qkv.weight"], ckpt["teacher"]["backbone.blocks.0.attn.qkv.weight"]
    assert not torch.equal(s, t)                                    # the teacher is an EMA of the student, not a copy


def test_last_layer_is_frozen_in_the_first_epoch_only(run_a):
    # student and teacher start equal and the teacher only moves towards the student (EMA): a student
    # tensor still equal to the teacher's after an epoch has not moved at all
    ckpt = [torch.load(os.path.join(run_a, f"checkpoint000{e}.pth"), weights_only=True) for e in (1, 2)]
    s0, t0 = ckpt[0]["student"], ckpt[0]["teacher"]                 # after epoch 0
    s1, t1 = ckpt[1]["student"], ckpt[1]["teacher"]                 # after epoch 1
    assert torch.equal(s0["head.last_layer.weight_v"], t0["head.last_layer.weight_v"])     # frozen in epoch 0
    for name in ("head.mlp.4.weight", "backbone.blocks.0.attn.qkv.weight"):              # the rest trained
        assert not torch.equal(s0[name], t0[name]), name
    assert not torch.equal(s1["head.last_layer.weight_v"], t1["head.last_layer.weight_v"])  # trained in epoch 1
    assert not torch.equal(s1["head.last_layer.weight_v"], s0["head.last_layer.weight_v"])
    assert torch.equal(s1["head.last_layer.weight_g"], torch.ones(32, 1))                 # --norm_last_layer: g = 1
    opt = ckpt[0]["optimizer"]["state"]                              # never stepped in epoch 0: no AdamW state
    assert "head.last_layer.weight_v" not in opt and "head.mlp.4.weight" in opt


def test_resume_reproduces_the_uninterrupted_run(run_a, tmp_path):
    out = str(tmp_path / "b")
    dino.train(dino.get_args(TINY + ["--output_dir", out, "--resume", os.path.join(run_a, "checkpoint0001.pth")]))
    resumed, full = read_log(out), read_log(run_a)[4:]
    assert [r["iteration"] for r in resumed] == [4, 5, 6, 7]
    for a, b in zip(resumed, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["teacher_entropy"] == pytest.approx(b["teacher_entropy"], rel=1e-5, abs=1e-6)
        assert a["lr"] == b["lr"] and a["momentum"] == b["momentum"] and a["teacher_temp"] == b["teacher_temp"]
    end_a = torch.load(os.path.join(run_a, "checkpoint.pth"), weights_only=True)
    end_b = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    torch.testing.assert_close(end_b["center"], end_a["center"], rtol=1e-5, atol=1e-6)
    for k in end_a["teacher"]:
        torch.testing.assert_close(end_b["teacher"][k], end_a["teacher"][k], rtol=1e-4, atol=1e-6)


def run_cli(*args, cwd=ROOT):  # the command line itself: exit code, one line on stderr, no traceback
    return subprocess.run([sys.executable, os.path.join(ROOT, "dino.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_clean_error(proc, *phrases):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for phrase in phrases:
        assert phrase in last, last


def assert_fails_in_process(argv, *phrases):
    """The argument checks run first in train(): one `error: ...` line through sys.exit (no subprocess needed)."""
    with pytest.raises(SystemExit) as e:
        dino.train(dino.get_args(argv))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


@pytest.mark.parametrize("extra,phrases", [
    (["--global_crops_size", "20"], ["--global_crops_size 20 is not divisible by --patch_size 8"]),
    (["--teacher_temp", "0"], ["--teacher_temp 0.0 is out of range: valid values lie in (0, inf)"]),
    (["--student_temp", "-0.1"], ["--student_temp -0.1 is out of range"]),
    (["--center_momentum", "1.5"], ["--center_momentum 1.5 is out of range: valid values lie in [0, 1]"]),
    (["--out_dim", "0"], ["--out_dim 0 is out of range: valid values lie in [1, inf)"]),
])
def test_bad_arguments(extra, phrases, tmp_path):
    assert_fails_in_process(TINY + ["--output_dir", str(tmp_path), *extra], *phrases)


def test_existing_run_needs_resume(run_a, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    shutil.copy(os.path.join(run_a, "checkpoint0001.pth"), out / "checkpoint.pth")
    assert_fails_in_process(TINY + ["--output_dir", str(out)], "pass --resume")
    assert_fails_in_process(TINY + ["--output_dir", str(tmp_path / "d"), "--resume"], "no checkpoint")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_a, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    shutil.copy(os.path.join(run_a, "checkpoint0001.pth"), out / "checkpoint.pth")
    before = (out / "checkpoint.pth").read_bytes()
    proc = run_cli(*TINY, "--output_dir", str(out), "--resume", "--lr", "1e30", "--warmup_epochs", "0")
    assert_clean_error(proc, "loss is not finite", "last good checkpoint")
    assert (out / "checkpoint.pth").read_bytes() == before
