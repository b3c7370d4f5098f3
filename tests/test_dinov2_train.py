"""DINOv2 end to end on the synthetic data: log, schedules, last-layer freezing, checkpoints, resume, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dinov2
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--proj_hidden_dim", "32", "--proj_dim", "8", "--out_dim", "32",
        "--data", "synthetic:32", "--batch_size_per_gpu", "8", "--epochs", "2", "--warmup_epochs", "1",
        "--warmup_teacher_temp_epochs", "1", "--num_workers", "0", "--log_every", "1", "--saveckp_freq", "1"]


def released_cosine_scheduler(base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0.0):
    """DINOv2's CosineScheduler (dinov2/utils/utils.py), transcribed: its per-iteration values (np.linspace warm-up;
    the SimDINO release's differs, see test_simdinov2.py)."""
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(out, name):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run_sk(tmp_path_factory):
    """The default recipe: Sinkhorn-Knopp targets."""
    out = str(tmp_path_factory.mktemp("dinov2_sk"))
    dinov2.train(dinov2.get_args(TINY + ["--output_dir", out]))
    return out


@pytest.fixture(scope="module")
def run_centering(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dinov2_centering"))
    dinov2.train(dinov2.get_args(TINY + ["--centering", "centering", "--output_dir", out]))
    return out


def test_log_schedules_and_checkpoint(run_sk):
    log = read_log(run_sk)
    assert [r["iteration"] for r in log] == list(range(8))
    assert set(log[0]) == {"iteration", "epoch", "time", "loss", "dino", "ibot", "koleo", "lr", "wd", "momentum",
                           "teacher_temp", "images_per_s", "skipped_images"}
    for r in log:
        assert r["loss"] == pytest.approx(r["dino"] + r["ibot"] + 0.1 * r["koleo"], rel=1e-5, abs=1e-6)
        assert r["ibot"] > 0 and r["dino"] > 0
    assert log[3]["lr"] == pytest.approx(0.004 * (8 / 1024) ** 0.5)           # sqrt scaling, end of warm-up
    assert log[0]["momentum"] == pytest.approx(0.992)
    # teacher temperature: linear per iteration over the first epoch (4 iterations), then constant
    assert [r["teacher_temp"] for r in log] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07, 0.07])
    # DINOv2's released schedules: lr warm-up from 0 (SimDINOv2's starts at min_lr), cosine to min_lr; wd and
    # momentum cosine over the whole run
    peak = 0.004 * (8 / 1024) ** 0.5
    expected = {"lr": released_cosine_scheduler(peak, 1e-6, 8, 4, start_warmup_value=0.0),
                "wd": released_cosine_scheduler(0.04, 0.4, 8), "momentum": released_cosine_scheduler(0.992, 1.0, 8),
                "teacher_temp": released_cosine_scheduler(0.07, 0.07, 4, 4, start_warmup_value=0.04).tolist() + [0.07] * 4}
    for key, values in expected.items():
        assert [r[key] for r in log] == pytest.approx(list(values), rel=1e-12, abs=1e-15), key
    teacher = vit.vit_from_checkpoint(os.path.join(run_sk, "checkpoint.pth"))    # heads are not the ViT
    assert teacher.num_register_tokens == 4 and isinstance(teacher.blocks[0].ls1, vit.LayerScale)
    ckpt = load(run_sk, "checkpoint.pth")
    assert {"dino_head.last_layer.weight_v", "dino_head.last_layer.weight_g"} <= set(ckpt["teacher"])
    assert ckpt["center"].abs().sum() == 0                                     # Sinkhorn-Knopp needs no centre


def test_last_layer_is_frozen_in_the_first_epoch(run_sk):
    # student and teacher start equal; the teacher is an EMA of the student, so a student layer that has
    # not moved leaves the teacher's equal to it, bit for bit
    e1, e2 = load(run_sk, "checkpoint0001.pth"), load(run_sk, "checkpoint0002.pth")
    for name in ("dino_head.last_layer.weight_v", "dino_head.last_layer.weight_g"):
        assert torch.equal(e1["student"][name], e1["teacher"][name]), name
        assert not torch.equal(e2["student"][name], e2["teacher"][name]), name
    assert not torch.equal(e1["student"]["dino_head.mlp.0.weight"], e1["teacher"]["dino_head.mlp.0.weight"])
    # as released (lr 0, not a dropped gradient), AdamW's moments of the frozen layer fill up meanwhile
    assert e1["optimizer"]["state"]["dino_head.last_layer.weight_v"]["exp_avg"].abs().sum() > 0


def test_resume_reproduces_the_uninterrupted_run(run_centering, tmp_path):
    e1, e2 = load(run_centering, "checkpoint0001.pth"), load(run_centering, "checkpoint0002.pth")
    for name in ("center", "patch_center"):                                   # the centres are part of the state
        assert e1[name].abs().sum() > 0 and not torch.equal(e1[name], e2[name])
    out = str(tmp_path / "resumed")
    dinov2.train(dinov2.get_args(TINY + ["--centering", "centering", "--output_dir", out,
                                         "--resume", os.path.join(run_centering, "checkpoint0001.pth")]))
    resumed, full = read_log(out), read_log(run_centering)[4:]
    assert [r["iteration"] for r in resumed] == [4, 5, 6, 7]
    for a, b in zip(resumed, full):
        for key in ("loss", "dino", "ibot", "koleo"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(load(out, "checkpoint.pth")["center"], e2["center"])


@pytest.mark.parametrize("extra,phrase", [
    (["--batch_size_per_gpu", "1"], "--batch_size_per_gpu 1 leaves KoLeo no nearest neighbour"),
    (["--mask_probability", "0"], "--ibot_loss_weight 1.0 needs masked patches"),
])
def test_bad_input(extra, phrase, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dinov2.py"), *TINY, "--output_dir", str(tmp_path),
                           *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, proc.stderr
