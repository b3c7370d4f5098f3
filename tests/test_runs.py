"""What a run of any of the four methods guarantees: exact resume mid-epoch, a log that reads as one run,
a prompt stop on Ctrl-C / SIGTERM, flags checked up front, nothing left behind by a run that never
started, and honest notes (CPU hours, warm-up longer than the run)."""
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["simdino", "simdinov2", "dino", "dinov2"]
# batch 16 and no --cov_group_size: the coding-rate groups are chosen from the batch (issue item 5)
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--proj_hidden_dim", "32", "--proj_dim", "8", "--data", "synthetic:64",
        "--batch_size_per_gpu", "16", "--warmup_epochs", "1", "--num_workers", "0", "--log_every", "1",
        "--saveckp_freq", "1"]
OWN = {"dino": ["--out_dim", "32"], "dinov2": ["--out_dim", "32"]}


def tiny(method, *extra):
    return TINY + OWN.get(method, []) + list(extra)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def error_of(mod, argv):
    """train() in this process; the one-line message it exits with."""
    with pytest.raises(SystemExit) as e:
        mod.train(mod.get_args(argv))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module", params=METHODS)
def run_a(request, tmp_path_factory):
    """2 epochs of --epoch_length 3 (64 images / 16 = 4 batches a pass, so epochs and passes do not line up),
    a checkpoint every 2 iterations, 2 data-loading workers; every checkpoint.pth written is kept by iteration."""
    mod = importlib.import_module(request.param)
    out = str(tmp_path_factory.mktemp(request.param))
    saved, save = {}, mod.save_checkpoint

    def save_and_keep(obj, path):
        save(obj, path)
        if os.path.basename(path) == "checkpoint.pth":
            saved[obj["iteration"]] = (obj["epoch"], open(path, "rb").read())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "save_checkpoint", save_and_keep)
        mod.train(mod.get_args(tiny(request.param, "--epochs", "2", "--epoch_length", "3", "--saveckp_every", "2",
                                    "--num_workers", "2", "--output_dir", out)))
    return mod, out, saved


def test_epoch_length_sets_schedules_log_and_checkpoints(run_a):
    mod, out, saved = run_a
    log = read_log(out)
    assert [r["iteration"] for r in log] == list(range(6))
    assert [r["epoch"] for r in log] == [0, 0, 0, 1, 1, 1]
    peak = log[3]["lr"]                                                # the cosine starts at the peak, in every file
    start = 1e-6 if mod.__name__ == "simdinov2" else 0.0               # SimDINOv2's release warms up from min_lr
    assert [r["lr"] for r in log] == pytest.approx(mod.cosine_schedule(peak, 1e-6, 2, 3, warmup_epochs=1,
                                                                       warmup_start=start))
    # mid-epoch checkpoints at iterations 2 and 4, epoch ends at 3 and 6
    assert {it: epoch for it, (epoch, _) in saved.items()} == {2: 0, 3: 1, 4: 1, 6: 2}
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["checkpoint.pth", "checkpoint0001.pth",
                                                                       "checkpoint0002.pth"]
    if mod.__name__.startswith("sim"):                                 # groups of the batch, 16: recorded
        assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["args"]["cov_group_size"] == 16


def test_resume_after_a_kill_mid_epoch_is_exact_and_the_log_reads_as_one_run(run_a, tmp_path):
    """As after kill -9 at iteration 5: checkpoint.pth is the one of iteration 4 (mid-epoch 1), log.jsonl
    already holds iterations 4 and 5. The resumed run, with no workers this time, redoes them bit for bit."""
    mod, out, saved = run_a
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    (killed / "checkpoint.pth").write_bytes(saved[4][1])
    with open(killed / "log.jsonl", "a") as f:
        f.write('{"iteration": 5, "loss": 0.1')                      # a record cut short by the kill
    mod.train(mod.get_args(tiny(mod.__name__, "--epochs", "2", "--epoch_length", "3", "--saveckp_every", "2",
                                "--output_dir", str(killed), "--resume")))
    full, resumed = read_log(out), read_log(killed)
    assert [r["iteration"] for r in resumed] == list(range(6))
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k not in ("time", "images_per_s")} == \
               {k: v for k, v in b.items() if k not in ("time", "images_per_s")}
    end_a = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    end_b = torch.load(killed / "checkpoint.pth", weights_only=True)
    for k in end_a["teacher"]:
        assert torch.equal(end_a["teacher"][k], end_b["teacher"][k]), k


def test_finished_run_is_not_retrained_and_a_failed_start_touches_nothing(run_a, tmp_path):
    mod, out, _ = run_a
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("checkpoint.pth", "log.jsonl")}
    assert "nothing to train" in error_of(mod, tiny(mod.__name__, "--epochs", "2", "--epoch_length", "3",
                                                    "--output_dir", out, "--resume"))
    msg = error_of(mod, tiny(mod.__name__, "--epochs", "4", "--epoch_length", "3", "--proj_dim", "16",
                             "--output_dir", out, "--resume"))
    assert "holds another model" in msg
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["truncated", "text", "random bytes", "no training state"])
def test_unreadable_resume_file_gives_one_line(method, kind, tmp_path):
    mod = importlib.import_module(method)
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {"w": torch.zeros(1000)}, "epoch": 1}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "text": b"epoch 3, loss 0.1\n",
                      "random bytes": random.Random(0).randbytes(3000), "no training state": data}[kind])
    msg = error_of(mod, tiny(method, "--epochs", "1", "--output_dir", str(tmp_path / "out"), "--resume", str(path)))
    assert f"--resume: {path}" in msg or f"--resume: cannot read {path}" in msg
    assert ("is not a training checkpoint" if kind == "no training state" else "cannot read") in msg
    assert not (tmp_path / "out").exists()


RANGE_CASES = [
    (["--epochs", "0"], "--epochs 0 is out of range: valid values lie in [1, inf)"),
    (["--epochs", "-1"], "--epochs -1 is out of range"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu 0 is out of range: valid values lie in [1, inf)"),
    (["--epoch_length", "0"], "--epoch_length 0 is out of range"),
    (["--lr", "-0.1"], "--lr -0.1 is out of range: valid values lie in [0, inf)"),
    (["--momentum_teacher", "1.5"], "--momentum_teacher 1.5 is out of range: valid values lie in [0, 1]"),
    (["--num_workers", "-2"], "--num_workers -2 is out of range"),
    (["--global_crops_scale", "0", "1"], "--global_crops_scale 0.0 1.0 is out of range: valid values lie in (0, 1]"),
    (["--drop_path_rate", "nan"], "--drop_path_rate nan is out of range"),
    (["--interpolate_offset", "1.5"], "--interpolate_offset 1.5 is out of range: valid values lie in [0, 1)"),
    (["--blur_radius", "-1", "1"], "--blur_radius -1.0 1.0 is out of range: valid values lie in [0, inf)"),
    (["--blur_radius", "2", "1"], "--blur_radius 2.0 1.0 must be given as min max"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("extra,phrase", RANGE_CASES + [
    (["--cov_group_size", "0"], "--cov_group_size 0 is out of range: valid values lie in [1, inf)"),
    (["--gamma", "-1"], "--gamma -1 is out of range: valid values lie in [0, inf), or 'released'")])
def test_flag_out_of_range_gives_one_line_and_writes_nothing(method, extra, phrase, tmp_path):
    if extra[0] in ("--cov_group_size", "--gamma") and not method.startswith("sim"):
        extra, phrase = ["--clip_grad", "-1"], "--clip_grad -1.0 is out of range"   # no coding rate in DINO
    mod = importlib.import_module(method)
    assert phrase in error_of(mod, tiny(method, "--output_dir", str(tmp_path / "out"), *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", METHODS)
def test_failed_start_on_the_command_line_leaves_no_folder(method, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{method}.py"), *tiny(method),
                           "--data", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", METHODS)
def test_complete_run_on_the_command_line_exits_0(method, tmp_path):
    """With data-loading workers, whose exits at the end raise SIGCHLD, which the signal watcher must let pass."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{method}.py"), *tiny(method), "--epochs", "1",
                           "--epoch_length", "2", "--num_workers", "2", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "stopped" not in proc.stderr, proc.stderr
    assert "done: teacher weights in" in proc.stdout
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["iteration"] == 2


def test_small_batch_group_size():
    simdino, simdinov2 = importlib.import_module("simdino"), importlib.import_module("simdinov2")
    assert [simdino.default_cov_group_size(b, 64) for b in (64, 128, 16, 100, 7)] == [64, 64, 16, 50, 7]
    assert [simdinov2.default_cov_group_size(b, 128) for b in (128, 256, 32, 96)] == [128, 128, 32, 96]
    # on several processes a small per-process batch joins the next processes' up to the recipe's group
    # (the group size dividing the global batch), and shrinks only where the world size does not allow it
    assert [simdino.default_cov_group_size(b, 64, 8) for b in (16, 24, 32, 7, 128)] == [64, 48, 64, 56, 64]
    assert [simdino.default_cov_group_size(16, 64, w) for w in (1, 2, 3, 6)] == [16, 32, 48, 48]
    assert [simdinov2.default_cov_group_size(b, 128, 8) for b in (64, 32, 128)] == [128, 128, 128]


def test_spanning_group_sizes_are_checked_against_the_world_size(monkeypatch):
    simdino = importlib.import_module("simdino")
    monkeypatch.setattr(simdino.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(simdino.dist, "get_world_size", lambda: 4)
    args = simdino.get_args(["--batch_size_per_gpu", "16", "--cov_group_size", "64"])
    simdino.check_args(args)                                           # 4 processes of 16: one group of 64
    for group in ("48", "128"):                                        # 3 processes; more than the global batch
        with pytest.raises(SystemExit, match=f"--batch_size_per_gpu 16 must be a multiple of --cov_group_size {group}"):
            simdino.check_args(simdino.get_args(["--batch_size_per_gpu", "16", "--cov_group_size", group]))


@pytest.mark.parametrize("method", METHODS)
def test_warmup_longer_than_the_run_is_said_once(method, tmp_path, capsys):
    mod = importlib.import_module(method)
    mod.train(mod.get_args(tiny(method, "--epochs", "1", "--epoch_length", "1", "--warmup_epochs", "2",
                                "--output_dir", str(tmp_path))))
    out = capsys.readouterr().out
    assert out.count("note: --warmup_epochs 2 >= --epochs 1: the learning rate rises for the whole run") == 1
    assert "done: " in out


@pytest.mark.parametrize("method", METHODS)
def test_help_shows_every_default_and_a_cpu_run(method, capsys):
    mod = importlib.import_module(method)
    with pytest.raises(SystemExit) as e:
        mod.get_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for default in ("(default: synthetic)", "(default: 100)", "(default: 8)", "(default: auto)", "(default: 500)"):
        assert default in text, default
    flat = re.sub(r"\s+", " ", text)
    assert flat.count("(default: ") >= len(vars(mod.get_args([])))    # every flag
    assert f"python {method}.py {mod.CPU_FLAGS}" in flat.replace(" \\ ", " ")   # lines continued with a backslash


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"       # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("method,signame", [("simdino", "SIGINT"), ("simdinov2", "SIGTERM"), ("dino", "SIGTERM"),
                                            ("dinov2", "SIGINT")])
def test_signal_stops_the_run_and_its_workers_at_once(method, signame, tmp_path):
    """A run far too long for a CPU says so after two iterations; the signal then ends it, workers included,
    within a couple of seconds, and the last checkpoint is intact."""
    out, stdout, stderr = tmp_path / "out", open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{method}.py"), *tiny(method),
                             "--epochs", "100000", "--saveckp_every", "2", "--num_workers", "2", "--output_dir", str(out)],
                            stdout=stdout, stderr=stderr, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while not ((out / "checkpoint.pth").exists() and "note: at" in (tmp_path / "stdout").read_text()):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()
            time.sleep(0.2)
        workers = children(proc.pid)
        assert len(workers) == 2
        start = time.time()
        proc.send_signal(getattr(signal, signame))
        rc = proc.wait(timeout=30)
        elapsed = time.time() - start
    finally:
        proc.kill()
    err, printed = (tmp_path / "stderr").read_text(), (tmp_path / "stdout").read_text()
    assert elapsed < 3 and rc == 128 + getattr(signal, signame), (elapsed, rc, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"stopped by {signame} after ")
    assert re.search(r"after \d+ iterations; the checkpoint \S+checkpoint.pth holds \d+ and is intact: --resume continues "
                     r"from it", err), err
    time.sleep(0.5)
    assert not any(alive(w) for w in workers)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] >= 2
    assert f"python {method}.py {importlib.import_module(method).CPU_FLAGS}" in printed
    if method.startswith("sim"):
        assert "coding rate on groups of 16" in printed


def test_requirements_give_minimum_versions_and_ci_pins_them():
    def lines(name):
        with open(os.path.join(ROOT, name)) as f:
            return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]

    req, pins = lines("requirements.txt"), lines("constraints.txt")
    assert not any("==" in r for r in req) and "torch>=2.11" in req   # the lowest the whole suite ran on
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(pins)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().strip().splitlines()[-1]
    assert ci in readme and "-c constraints.txt" in ci and "python -m pytest tests -q" in ci
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 11)


@pytest.mark.parametrize("method", METHODS)
def test_without_self_distillation_the_teacher_is_the_student_after_every_step(method, tmp_path):
    """--momentum_teacher 0 --final_momentum_teacher 0 (the paper's Table 9): after each step the teacher's
    weights are the student's, bit for bit; the default schedule rises from --momentum_teacher towards 1,
    another --final_momentum_teacher towards it."""
    mod = importlib.import_module(method)
    saved, save = [], mod.save_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "save_checkpoint", lambda obj, path: save(obj, path) or saved.append(torch.load(path)))
        mod.train(mod.get_args(tiny(method, "--epochs", "1", "--epoch_length", "3", "--saveckp_every", "1",
                                    "--momentum_teacher", "0", "--final_momentum_teacher", "0",
                                    "--output_dir", str(tmp_path / "m0"))))
    assert [c["iteration"] for c in saved] == [1, 2, 3, 3]             # every step, then the epoch's end
    for ckpt in saved:
        assert ckpt["student"].keys() == ckpt["teacher"].keys()
        for k, v in ckpt["student"].items():
            assert torch.equal(ckpt["teacher"][k], v), (ckpt["iteration"], k)
    assert {r["momentum"] for r in read_log(str(tmp_path / "m0"))} == {0.0}
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(saved[0]["teacher"][qkv], saved[2]["teacher"][qkv])   # it follows a student that learns
    mod.train(mod.get_args(tiny(method, "--epochs", "1", "--epoch_length", "3", "--momentum_teacher", "0.5",
                                "--final_momentum_teacher", "0.6", "--output_dir", str(tmp_path / "m5"))))
    momenta = [r["momentum"] for r in read_log(str(tmp_path / "m5"))]
    assert momenta[0] == 0.5 and momenta == sorted(momenta) and 0.55 < momenta[-1] < 0.6
