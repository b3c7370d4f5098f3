"""recipes/cifar10.sh end to end on a few hundred fake CIFAR-sized JPEGs: the README's CIFAR-10 commands
(the real-folder loader, each method's recipe flags, k-NN with --compare_init and the linear probe), only
shorter. The full runs are not a test; this checks that their code path works and writes what the README
table and plot_runs.py read."""
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


@pytest.mark.parametrize("method", ["simdino", "dino", "simdinov2", "dinov2"])
def test_cifar10_recipe_trains_and_evaluates(method, cifar_tree, tmp_path):
    out = str(tmp_path / method)
    seed = 3 if method == "dinov2" else 0                  # SEED's default (the README's runs), and SEED=3
    env = dict(os.environ, EPOCH_LENGTH="2", EPOCHS="2", LINEAR_EPOCHS="1", NUM_WORKERS="0",
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("SEED", None)
    if seed:
        env["SEED"] = str(seed)
    # EXTRA: flags after the method's own, so they override them; DINO's own --momentum_teacher 0.996 here
    extra = {"momentum_teacher": 0.0, "final_momentum_teacher": 0.0} if method == "dino" else {}
    env.pop("EXTRA", None)
    if extra:
        env["EXTRA"] = "--momentum_teacher 0 --final_momentum_teacher 0"
    run = subprocess.run(["bash", os.path.join("recipes", "cifar10.sh"), method, cifar_tree, out], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    # training: 2 epochs of 2 iterations on the folder's train split, the recipe's flags in the checkpoint
    log = plot_runs.read_log(out)
    assert log[-1]["iteration"] == 3 and all(np.isfinite(r["loss"]) for r in log)             # 4 iterations
    ckpt = torch.load(os.path.join(out, "checkpoint0002.pth"), map_location="cpu", weights_only=False)
    args = ckpt["args"]
    shared = {"arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32, "local_crops_size": 16,
              "local_crops_number": 4, "global_crops_scale": [0.25, 1.0], "local_crops_scale": [0.05, 0.25],
              "batch_size_per_gpu": 64, "lr": 0.002, "momentum_teacher": 0.95, "drop_path_rate": 0.1,
              "warmup_epochs": 1, "seed": seed}
    for name, value in {**shared, **OWN[method], **extra}.items():
        got = list(args[name]) if isinstance(args[name], (list, tuple)) else args[name]
        assert got == value, (name, got, value)
    if extra:                                              # without self-distillation: the teacher is the student
        assert ckpt["teacher"].keys() == ckpt["student"].keys()
        assert all(torch.equal(ckpt["teacher"][k], v) for k, v in ckpt["student"].items())

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
