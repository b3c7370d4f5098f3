"""simdino.py end to end on the embedded dataset: log, checkpoints, resume, bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import simdino
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--local_crops_size", "8",
        "--local_crops_number", "2", "--proj_hidden_dim", "64", "--proj_dim", "16", "--data", "synthetic:64",
        "--batch_size_per_gpu", "16", "--cov_group_size", "8", "--epochs", "2", "--warmup_epochs", "1",
        "--num_workers", "0", "--log_every", "1", "--saveckp_freq", "1"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("a"))
    simdino.train(simdino.get_args(TINY + ["--output_dir", out]))
    return out


def test_log_and_schedules(run_a):
    log = read_log(run_a)
    assert [r["iteration"] for r in log] == list(range(8))           # 64 images / 16 = 4 it/epoch, 2 epochs
    assert all(np.isfinite(r["loss"]) for r in log)
    lr = simdino.cosine_schedule(0.0005 * 16 / 256, 1e-6, 2, 4, warmup_epochs=1)
    assert [r["lr"] for r in log] == pytest.approx(lr)
    assert log[0]["lr"] == 0.0 and log[3]["lr"] == pytest.approx(0.0005 * 16 / 256)      # warm-up ends at its peak
    assert log[0]["wd"] == pytest.approx(0.04) and log[4]["wd"] > 0.2                    # cosine 0.04 -> 0.4
    assert log[0]["momentum"] == pytest.approx(0.996) and log[-1]["momentum"] > 0.999
    for r in log:                                                   # the logged parts add up to the loss
        gamma = simdino.released_gamma(16, 16)
        assert r["loss"] == pytest.approx(r["distance"] - gamma * r["R_eps"], rel=1e-5, abs=1e-6)


def test_checkpoint_holds_a_loadable_teacher(run_a):
    ckpt = torch.load(os.path.join(run_a, "checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 8 and ckpt["args"]["arch"] == "vit_tiny"
    assert os.path.exists(os.path.join(run_a, "checkpoint0001.pth"))
    teacher = vit.vit_from_checkpoint(os.path.join(run_a, "checkpoint.pth")).eval()
    _, reference = simdino.build_networks(simdino.get_args(TINY))
    reference.load_state_dict(ckpt["teacher"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(teacher(x), reference.backbone.eval()(x))
    # the teacher is an EMA of the student, not a copy
    s, t = ckpt["student"]["backbone.blocks.0.attn.qkv.weight"], ckpt["teacher"]["backbone.blocks.0.attn.qkv.weight"]
    assert not torch.equal(s, t)
    student = vit.vit_from_checkpoint(os.path.join(run_a, "checkpoint.pth"), which="student")
    torch.testing.assert_close(student.blocks[0].attn.qkv.weight, s)


def test_resume_reproduces_the_uninterrupted_run(run_a, tmp_path):
    out = str(tmp_path / "b")
    simdino.train(simdino.get_args(TINY + ["--output_dir", out, "--resume", os.path.join(run_a, "checkpoint0001.pth")]))
    resumed, full = read_log(out), read_log(run_a)[4:]
    assert [r["iteration"] for r in resumed] == [4, 5, 6, 7]
    for a, b in zip(resumed, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["lr"] == b["lr"] and a["momentum"] == b["momentum"]
    end_a = torch.load(os.path.join(run_a, "checkpoint.pth"), weights_only=True)["teacher"]
    end_b = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["teacher"]
    for k in end_a:
        torch.testing.assert_close(end_b[k], end_a[k], rtol=1e-4, atol=1e-6)


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    simdino.save_checkpoint({"epoch": 1}, path)
    with pytest.raises(Exception):
        simdino.save_checkpoint({"epoch": 2, "bad": lambda: 0}, path)   # cannot be pickled: fails mid-write
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def train_error(*args):
    """Run train in this process and return the one-line message it exits with."""
    with pytest.raises(SystemExit) as exit_info:
        simdino.train(simdino.get_args(list(args)))
    msg = str(exit_info.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "simdino.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def assert_clean_error(proc, *phrases):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for phrase in phrases:
        assert phrase in last, last


@pytest.mark.parametrize("extra,phrase", [
    (["--global_crops_size", "20"], "--global_crops_size 20 is not divisible by --patch_size 8"),
    (["--batch_size_per_gpu", "4"], "multiple of --cov_group_size 8"),
    (["--gamma", "big"], "--gamma 'big'"),
    (["--eps", "0"], "--eps 0.0 is out of range: valid values lie in (0, inf)"),
    (["--data", "synthetic:8"], "8 images are fewer than one global batch of 16"),
])
def test_bad_arguments(extra, phrase, tmp_path):
    assert phrase in train_error(*TINY, "--output_dir", str(tmp_path), *extra)


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_bad_data_folder_on_the_command_line(folder, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(*TINY, "--output_dir", str(tmp_path / "out"), "--data", str(tmp_path / folder))
    assert_clean_error(proc, "does not exist" if folder == "missing" else "no class sub-folders")


def test_existing_run_needs_resume(run_a, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    shutil.copy(os.path.join(run_a, "checkpoint0001.pth"), out / "checkpoint.pth")
    assert "pass --resume" in train_error(*TINY, "--output_dir", str(out))
    assert "no checkpoint" in train_error(*TINY, "--output_dir", str(tmp_path / "d"), "--resume")
    msg = train_error(*TINY, "--output_dir", str(out), "--resume", "--proj_dim", "32")   # another architecture
    assert "holds another model" in msg and "head.mlp.4" in msg


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_a, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    shutil.copy(os.path.join(run_a, "checkpoint0001.pth"), out / "checkpoint.pth")
    before = (out / "checkpoint.pth").read_bytes()
    proc = run_cli(*TINY, "--output_dir", str(out), "--resume", "--lr", "1e30", "--warmup_epochs", "0")
    assert_clean_error(proc, "loss is not finite", "last good checkpoint")
    assert (out / "checkpoint.pth").read_bytes() == before
