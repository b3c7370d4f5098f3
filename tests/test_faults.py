"""What machines and users do to runs: a full disk, an output folder that cannot be written, two runs in one folder,
a stop during a save, another process of the run ending first, unreadable images in an evaluation, and image files
that a plain convert("RGB") would read wrongly. Each ends with one line and leaves nothing behind.

The full disk is a real one where the test can mount a small tmpfs in a private mount namespace (`unshare`, as root
or in a user namespace); elsewhere torch.save's writes fail with ENOSPC from the kernel by going to /dev/full."""
import errno
import fcntl
import importlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import data
import eval_knn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--proj_hidden_dim", "32", "--proj_dim", "8", "--data", "synthetic:64",
        "--batch_size_per_gpu", "16", "--warmup_epochs", "1", "--num_workers", "0", "--log_every", "1",
        "--saveckp_freq", "0", "--epochs", "1", "--epoch_length", "2"]
simdino = importlib.import_module("simdino")


def error_of(argv, mod=simdino):
    with pytest.raises(SystemExit) as e:
        mod.train(mod.get_args(argv))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def no_heavy_work(monkeypatch, mod=simdino):
    def refuse(*a, **k):
        raise AssertionError("the data set or the networks were built before the output folder was checked")
    monkeypatch.setattr(mod, "build_dataset", refuse)
    monkeypatch.setattr(mod, "build_networks", refuse)


# ----------------------------------------------------------------------------- the output folder

def test_unwritable_output_folder_fails_at_once_naming_the_path(tmp_path, monkeypatch):
    no_heavy_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for folder, why in ((afile / "sub", "a part of the path is a file, not a folder"),
                        (afile, "it is a file, not a folder"), ("/proc/simdino-test", "No such file or directory")):
        msg = error_of(TINY + ["--output_dir", str(folder)])
        assert msg == f"error: cannot write to --output_dir {folder}: {why}; choose a folder this user can write"


def test_a_live_run_holds_its_folder_and_a_killed_ones_lock_and_partial_files_do_not(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"pid 4242 on node7, simdino.py started 2026-01-01 00:00:00 UTC")
        print("locked", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with monkeypatch.context() as m:
            no_heavy_work(m)
            msg = error_of(TINY + ["--output_dir", str(out)])
        assert msg == (f"error: --output_dir {out} is in use by a live run (pid 4242 on node7, simdino.py started "
                       f"2026-01-01 00:00:00 UTC): wait for it to end or stop it, or choose another --output_dir")
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it; a partial checkpoint of a killed save is removed at the start
    simdino.train(simdino.get_args(TINY + ["--output_dir", str(out)]))
    (out / "checkpoint.pth.node7.4242.tmp").write_bytes(b"\0" * 1000)
    simdino.train(simdino.get_args(TINY + ["--epochs", "2", "--output_dir", str(out), "--resume"]))
    printed = capsys.readouterr().out
    assert "note: removed checkpoint.pth.node7.4242.tmp (0.0 MB), left by a run stopped while writing it" in printed
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 4
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.jsonl", "run.lock"]
    assert "simdino" in (out / "run.lock").read_text() and f"pid {os.getpid()} " in (out / "run.lock").read_text()
    fd = os.open(out / "run.lock", os.O_RDWR)                        # released at the end of the run
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


# ----------------------------------------------------------------------------- a full disk

def private_tmpfs():
    """The unshare command that runs a command with a tmpfs of its own at a path, or None where none can be had."""
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which("unshare") and subprocess.run(cmd + ["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                                                      capture_output=True).returncode == 0:
            return cmd
    return None


def test_a_full_disk_stops_with_one_line_saying_what_the_checkpoint_needs_and_leaves_no_partial_file(tmp_path):
    args = simdino.get_args(TINY)
    student, teacher = simdino.build_networks(args)
    size = simdino.tensor_bytes([student.state_dict(), teacher.state_dict()]) * 2   # + AdamW's two moments
    out = tmp_path / "disk"
    out.mkdir()
    run = [sys.executable, os.path.join(ROOT, "simdino.py"), *TINY, "--saveckp_every", "1", "--output_dir",
           str(out / "run")]
    unshare = private_tmpfs()
    if unshare:      # room for one checkpoint and a half: the second save runs out of it
        proc = subprocess.run(unshare + ["sh", "-c", f"mount -t tmpfs -o size={int(size * 1.5)} tmpfs {out} && "
                                         f"{' '.join(run)}; echo rc=$?; ls -a {out / 'run'}"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        files = proc.stdout.split("rc=")[1].split()[1:]
    else:            # the saves write to /dev/full: ENOSPC from the kernel
        wrapper = (f"import os, runpy, simdino; real = os.open\n"
                   f"os.open = lambda p, *a, **k: real('/dev/full', os.O_WRONLY) if str(p).endswith('.tmp') and "
                   f"'checkpoint' in str(p) else real(p, *a, **k)\n"
                   f"sys_argv = {run[1:]!r}\nimport sys; sys.argv = sys_argv\nrunpy.run_path(sys_argv[0], run_name='__main__')")
        proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=300, cwd=ROOT)
        proc.stdout += f"rc={proc.returncode}"
        files = sorted(os.listdir(out / "run"))
    assert "Traceback" not in proc.stderr and "rc=1" in proc.stdout, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    ckpt = out / "run" / "checkpoint.pth"
    m = re.fullmatch(rf"error: the disk is full writing {re.escape(str(ckpt))}: it needs ([0-9.]+) MB and [0-9.]+ MB "
                     rf"are free there(; the previous checkpoint.pth is intact)?\. Make room, or move the folder to a "
                     rf"larger disk, then continue with --resume", last)
    assert m and float(m.group(1)) == pytest.approx(size / 1e6, rel=0.01), last
    assert not [f for f in files if f.endswith(".tmp")], files                        # no partial file left
    if unshare:
        assert "the previous checkpoint.pth is intact" in last and "checkpoint.pth" in files


# ----------------------------------------------------------------------------- a stop during a save

def test_a_stop_during_a_save_removes_the_partial_file_and_counts_iterations_as_the_checkpoint(tmp_path):
    """SIGTERM arrives while the checkpoint's temporary file is half written: it goes, the previous file stays."""
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"previous")
    child = textwrap.dedent(f"""
        import os, signal, time, simdino
        simdino.stop_on_signals()
        simdino.RUN.update(done=8, path={str(path)!r}, saved=({str(path)!r}, 6))
        def write(f):
            f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        simdino.write_atomically({str(path)!r}, write, 100)""")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"stopped by SIGTERM after 8 iterations; the checkpoint {path} holds 6 and is "
                                   f"intact: --resume continues from it")
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and path.read_bytes() == b"previous"


# ----------------------------------------------------------------------------- another process of the run ends

def test_the_first_surviving_rank_learns_which_process_ended_first(monkeypatch):
    """torchrun's store: each process that stops on a signal marks itself; one that died first never does."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setitem(simdino.RUN, "world_size", 3)
    monkeypatch.setitem(simdino.RUN, "rank", 2)
    store.set("stopping-0-1", "1")                                   # rank 1 stopped on the signal; rank 0 died
    assert simdino.peers_gone(wait=0.3) == [0]
    store.set("stopping-0-0", "1")
    assert simdino.peers_gone(wait=0.3) == []                        # everyone stopped together: Ctrl-C, scancel


def test_a_broken_connection_to_another_process_is_one_line(tmp_path):
    child = textwrap.dedent("""
        import simdino
        simdino.RUN.update(world_size=2, done=5)
        try:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:6131")
        except Exception as e:
            simdino.stop_if_peer_lost(e)
            raise""")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: another process of this run ended first (its message or torchrun's report "
                                   "says why), and this one lost its connection to it after 5 iterations; no "
                                   "checkpoint was written yet, so a new run starts from the beginning")


# ----------------------------------------------------------------------------- evaluations

def write_tree(root):
    """train/ and val/ with two classes of four 8 x 8 PNGs each (all different), two unreadable val files and a .heic
    file that is not read."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    (root / "val" / "cat" / "0.png").write_bytes(b"not a png")
    (root / "val" / "dog" / "9.jpg").write_bytes(b"")
    (root / "val" / "dog" / "phone.heic").write_bytes(b"\0" * 10)


def test_knn_scores_each_readable_image_once_and_lists_the_rest(tmp_path, capsys):
    write_tree(tmp_path / "tree")
    eval_knn.main(eval_knn.get_args(["--raw_pixels", "--data", str(tmp_path / "tree"), "--resize_size", "8",
                                     "--crop_size", "8", "--nb_knn", "1", "--num_workers", "2", "--output_dir",
                                     str(tmp_path)]))
    res = json.loads((tmp_path / "raw_pixels_knn.json").read_text())
    assert (res["num_train"], res["num_val"], res["skipped_images"]) == (8, 7, 2)
    assert res["unreadable_images"] == [str(tmp_path / "tree" / "val" / "cat" / "0.png"),
                                        str(tmp_path / "tree" / "val" / "dog" / "9.jpg")]
    assert res["skipped_by_extension"] == {".heic": 1}
    assert "note: not scored: 2 unreadable images, 1 .heic files" in capsys.readouterr().out
    val = data.build_dataset(str(tmp_path / "tree"), eval_knn.eval_transform(8, 8), "val", "drop")
    feats, labels = eval_knn.extract_features(torch.nn.Flatten(), val, torch.device("cpu"), batch_size=3)
    assert len(feats) == 7 and len(torch.unique(feats, dim=0)) == 7              # no image stands in for another
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_an_evaluation_that_cannot_write_its_json_fails_before_it_reads_anything(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("images read before the output was checked")
    monkeypatch.setattr(eval_knn, "build_splits", refuse)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        eval_knn.main(eval_knn.get_args(["--raw_pixels", "--output_json", str(tmp_path / "afile" / "r.json")]))
    assert str(e.value.code) == (f"error: cannot write the result to {tmp_path / 'afile' / 'r.json'}: a part of the "
                                 f"path is a file, not a folder; pass --output_json FILE or --output_dir DIR where "
                                 f"this user can write")


# ----------------------------------------------------------------------------- decoding

def test_evaluation_files_are_written_atomically_and_a_full_disk_is_one_line(tmp_path):
    """The JSON and --save_features' files: a write that fails (ENOSPC here) stops with one line, leaves no partial
    file and keeps the previous one."""
    path = tmp_path / "knn_features.pth"
    path.write_bytes(b"previous")

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit) as e:
        eval_knn.write_atomically(str(path), full_disk, "; pass --save_features DIR on a disk with room")
    assert str(e.value.code) == (f"error: cannot write {path}: the disk is full; pass --save_features DIR on a disk "
                                 f"with room")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["knn_features.pth"]
    eval_knn.write_atomically(str(path), lambda f: torch.save({"x": torch.ones(2)}, f))
    assert torch.equal(torch.load(path)["x"], torch.ones(2)) and os.listdir(tmp_path) == ["knn_features.pth"]


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 6, 257, 30000, 65473, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")                            # a 16-bit grayscale PNG
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = data.load_image(tmp_path / "g16.png")
    assert img.mode == "RGB" and np.asarray(img)[0, :, 0].tolist() == [0, 0, 1, 117, 255, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(data.load_image(tmp_path / "f.tif"))[0, :, 1].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ValueError, match="no defined 8-bit scale"):
        data.load_image(tmp_path / "i32.tif")


def test_gifs_are_read_other_image_kinds_counted_and_exif_orientation_left_as_the_released_loaders_leave_it(tmp_path):
    root = tmp_path / "tree" / "a"
    root.mkdir(parents=True)
    Image.new("P", (5, 3), 7).save(root / "anim.gif")
    exif = Image.Exif()
    exif[0x0112] = 6                                                              # "rotate 90 degrees to display"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(root / "phone.jpg", exif=exif)
    for name in ("x.heic", "y.HEIC", "z.svg", "notes.txt"):
        (root / name).write_bytes(b"")
    ds = data.ImageFolderDataset(tmp_path / "tree")
    assert [os.path.basename(p) for p, _ in ds.samples] == ["anim.gif", "phone.jpg"]
    assert ds.skipped_by_extension == {".heic": 2, ".svg": 1}
    assert ds[0][0].size == (5, 3) and ds[1][0].size == (40, 20)                # stored pixels, not rotated
