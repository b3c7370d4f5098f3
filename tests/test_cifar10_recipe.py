"""recipes/cifar10.sh: each method's commands as the script builds them, and the whole script for SimDINO on a
few hundred fake CIFAR-sized JPEGs (the real-folder loader, k-NN with --compare_init, the linear probe and the
k-NN curve), only shorter. The full runs are not a test; this checks that their code path works and writes what
docs/cifar10.md's tables and plot_runs.py read."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import plot_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_tree(root, per_class, seed=0):
    """ROOT/{train,test}/<class>/*.jpg as ../shared/data/cifar10.tar.gz is laid out: 32 x 32 JPEGs, each
    class a colour plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name))
            colour = np.array([(c * 70) % 256, (c * 150) % 256, (c * 30 + 90) % 256])
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i:04d}.jpg"), quality=90)


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar_tree(root, {"train": 24, "test": 8})                    # 240 train, 80 test images
    return str(root)


# what recipes/cifar10.sh gives each method beyond the shared flags
OWN = {"dino": {"out_dim": 4096, "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0, "lr": 0.0005,
                "momentum_teacher": 0.996},
       "dinov2": {"out_dim": 4096, "ibot_out_dim": 4096, "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0},
       "simdino": {"gamma": "0.00586"},               # a number or "released", kept as given
       "simdinov2": {"gamma": "0.0098"}}


def check_topk(res):
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0


def run_recipe(method, data, out, seed=None, extra=None, python=(sys.executable,), epochs=2, curve=None, rc=0):
    env = dict(os.environ, EPOCH_LENGTH="2", EPOCHS=str(epochs), LINEAR_EPOCHS="1", NUM_WORKERS="0",
               PYTHON=" ".join(python), OMP_NUM_THREADS="1")
    env.pop("STAGES", None)                                # every stage
    for name, value in {"SEED": seed, "EXTRA": extra, "CURVE_EPOCHS": curve}.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    run = subprocess.run(["bash", os.path.join("recipes", "cifar10.sh"), method, data, out], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == rc, run.stderr[-3000:]
    return run


def write_recorder(tmp_path):
    """A stand-in for python that appends its arguments to the file named first, as one JSON line, instead of
    running them: PYTHON="python record.py calls.jsonl" records the recipe's commands."""
    recorder = tmp_path / "record.py"
    recorder.write_text("import json, sys\nwith open(sys.argv[1], 'a') as f:\n"
                        "    f.write(json.dumps(sys.argv[2:]) + '\\n')\n")
    return recorder


# the flags all four methods share in the recipe
SHARED = {"arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32, "local_crops_size": 16,
          "local_crops_number": 4, "global_crops_scale": [0.25, 1.0], "local_crops_scale": [0.05, 0.25],
          "batch_size_per_gpu": 64, "lr": 0.002, "momentum_teacher": 0.95, "drop_path_rate": 0.1,
          "warmup_epochs": 1, "epochs": 2, "epoch_length": 2, "saveckp_freq": 1, "num_workers": 0}


def check_recipe_args(args, method, seed, extra=None):
    for name, value in {**SHARED, **OWN[method], "seed": seed, **(extra or {})}.items():
        got = getattr(args, name) if not isinstance(args, dict) else args[name]
        got = list(got) if isinstance(got, (list, tuple)) else got
        assert got == value, (name, got, value)


@pytest.mark.parametrize("method", ["simdino", "dino", "simdinov2", "dinov2"])
def test_cifar10_recipe_gives_each_method_its_flags(method, tmp_path):
    """The commands the recipe runs, recorded instead of run, the training's read back by the method's own
    parser: the shared flags, the method's own, SEED's default and another SEED, and EXTRA overriding the
    method's own (DINO's --momentum_teacher 0.996); then the evaluations' commands."""
    recorder = write_recorder(tmp_path)
    calls = tmp_path / "calls.jsonl"
    mod = __import__(method)
    for seed, extra in ((None, None), ("3", "--momentum_teacher 0 --final_momentum_teacher 0")):
        calls.unlink(missing_ok=True)
        out = str(tmp_path / f"out{seed}")
        os.makedirs(out)
        for epoch in (1, 2):                               # what the training would leave, for the curve's glob
            open(os.path.join(out, f"checkpoint{epoch:04d}.pth"), "w").close()
        run_recipe(method, str(tmp_path / "data"), out, seed=seed, extra=extra,
                   python=(sys.executable, str(recorder), str(calls)))
        train, knn, linear, curve = [json.loads(line) for line in calls.read_text().splitlines()]
        assert train[0] == f"{method}.py" and train[-4:] == ["--data", str(tmp_path / "data"), "--output_dir", out]
        check_recipe_args(mod.get_args(train[1:]), method, int(seed or 0),
                          {"momentum_teacher": 0.0, "final_momentum_teacher": 0.0} if extra else {})
        last = os.path.join(out, "checkpoint0002.pth")
        evaluation = ["--data", str(tmp_path / "data"), "--resize_size", "32", "--crop_size", "32",
                      "--num_workers", "0"]
        floor = ["--init_layerscale", "0.1"] if method == "dinov2" else []     # not DINOv2's 1e-5: chance
        assert knn == ["eval_knn.py", "--checkpoint", last, *evaluation, "--nb_knn", "10", "20", "100", "200",
                       "--compare_init", *floor]
        assert linear == ["eval_linear.py", "--checkpoint", last, *evaluation, "--epochs", "1",
                          "--output_json", os.path.join(out, "linear.json")]
        assert curve == ["eval_knn.py", "--checkpoint", os.path.join(out, "checkpoint0001.pth"), *evaluation,
                         "--nb_knn", "10", "20", "100", "200"]                    # the earlier epochs only


def test_cifar10_recipe_curve_epochs(tmp_path):
    """CURVE_EPOCHS picks the curve's checkpoints (the long runs' 1,000 and 2,000 iterations of 11 epochs: "4 8");
    an epoch that is not an earlier one stops the script with one line before anything is trained."""
    recorder = write_recorder(tmp_path)
    calls, out = tmp_path / "calls.jsonl", str(tmp_path / "out")
    os.makedirs(out)
    for epoch in range(1, 6):
        open(os.path.join(out, f"checkpoint{epoch:04d}.pth"), "w").close()
    python = (sys.executable, str(recorder), str(calls))
    run_recipe("simdino", str(tmp_path / "data"), out, python=python, epochs=5, curve="2 04")
    curve = json.loads(calls.read_text().splitlines()[-1])
    assert curve[:4] == ["eval_knn.py", "--checkpoint", os.path.join(out, "checkpoint0002.pth"),
                         os.path.join(out, "checkpoint0004.pth")] and curve[4] == "--data"
    for bad in ("5", "0", "two", "3 -1"):                  # the last epoch is the knn stage's; 0 is no checkpoint
        calls.unlink(missing_ok=True)
        run = run_recipe("simdino", str(tmp_path / "data"), out, python=python, epochs=5, curve=bad, rc=2)
        assert run.stderr.startswith("error: CURVE_EPOCHS") and len(run.stderr.splitlines()) == 1
        assert not calls.exists()                           # nothing ran, the training least of all


def test_cifar10_recipe_trains_and_evaluates(cifar_tree, tmp_path):
    """The whole script for one method (the others' commands are checked above, their checkpoints' evaluation
    in tests/test_eval_knn.py): training, k-NN with --compare_init, the linear probe and the k-NN curve."""
    out = str(tmp_path / "simdino")
    seed = 3                                               # not the default: the floor must follow SEED
    run_recipe("simdino", cifar_tree, out, seed=str(seed))

    # training: 2 epochs of 2 iterations on the folder's train split, the recipe's flags in the checkpoint
    log = plot_runs.read_log(out)
    assert log[-1]["iteration"] == 3 and all(np.isfinite(r["loss"]) for r in log)             # 4 iterations
    ckpt = torch.load(os.path.join(out, "checkpoint0002.pth"), map_location="cpu", weights_only=False)
    check_recipe_args(ckpt["args"], "simdino", seed)

    # k-NN of both checkpoints, the last one also at init; plot_runs puts them at iterations 2 and 4
    for epoch in (1, 2):
        with open(os.path.join(out, f"checkpoint{epoch:04d}_knn.json")) as f:
            knn = json.load(f)
        assert knn["num_train"] == 240 and knn["num_val"] == 80 and knn["num_classes"] == 10
        assert knn["backbone"] == "vit_tiny/8" and knn["crop_size"] == 32 and knn["skipped_images"] == 0
        assert sorted(knn["knn"], key=int) == ["10", "20", "100", "200"]
        for res in knn["knn"].values():
            check_topk(res)
        assert ("init" in knn) == (epoch == 2)
    assert knn["init"]["seed"] == seed                     # the floor is the run's own initialisation
    for res in knn["init"]["knn"].values():
        check_topk(res)
    points, init = plot_runs.read_knn(out, "20")
    assert [it for it, _ in points] == [2, 4] and init == knn["init"]["knn"]["20"]["top1"]

    # linear probe of the last checkpoint
    with open(os.path.join(out, "linear.json")) as f:
        linear = json.load(f)
    assert linear["checkpoint"].endswith("checkpoint0002.pth") and linear["epochs"] == 1
    assert linear["num_train"] == 240 and linear["num_val"] == 80
    check_topk(linear)
