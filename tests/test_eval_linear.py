"""eval_linear.py: the probe learns separable features and not shuffled labels, the feature layout, the training
loop's few host reads, 1 vs 2 processes, every checkpoint layout, the script end to end (the --compare_init floor
and its layerscale), bad input (folders without splits, one class)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import eval_linear
import vit
from test_eval_knn import LAYOUTS, dinov2_like, layouts, split_trees, write_tree  # noqa: F401 (fixtures)
from dist_step import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "synthetic:40", "--resize_size", "18", "--crop_size", "16", "--num_workers", "0",
         "--batch_size_per_gpu", "20", "--epochs", "1"]
CPU = torch.device("cpu")


def identity(f):
    return f


def clusters(n_per_class, num_classes=4, dim=16, noise=0.3, seed=0):
    """Gaussian clusters around fixed random centres (linearly separable at this noise); seed draws the noise."""
    centres = 2 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    g = torch.Generator().manual_seed(seed)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def loader(x, y, batch_size=32, shuffle=True):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- the classifiers

def test_heads_init_as_dino():
    torch.manual_seed(0)
    heads = eval_linear.LinearHeads(384, 1000, 3)
    assert len(heads.heads) == 3 and heads(torch.zeros(2, 384)).shape == (3, 2, 1000)
    for h in heads.heads:
        assert abs(h.weight.std().item() - 0.01) < 2e-4 and h.bias.abs().max() == 0


def test_probe_learns_separable_features_and_not_shuffled_labels():
    xtr, ytr = clusters(50)
    xte, yte = clusters(25, seed=1)
    lrs = [1e-4, 0.1, 1.0]
    torch.manual_seed(0)
    heads = eval_linear.LinearHeads(16, 4, len(lrs))
    eval_linear.train_heads(heads, loader(xtr, ytr), identity, lrs, epochs=10, device=CPU)
    accs = eval_linear.evaluate_heads(heads, loader(xte, yte, shuffle=False), identity, CPU)   # (3, 2)
    assert accs.shape == (3, 2)
    assert accs[:, 0].max() == 100.0 and accs[2, 0] == 100.0          # a good lr separates the clusters
    assert (accs[:, 1] == 100.0).all()                                # 4 classes: top-5 is top-4, always right
    # the same features with the train labels shuffled: nothing to learn, near chance (25 %) on the test set
    torch.manual_seed(0)
    heads = eval_linear.LinearHeads(16, 4, len(lrs))
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))]
    eval_linear.train_heads(heads, loader(xtr, shuffled), identity, lrs, epochs=10, device=CPU)
    accs = eval_linear.evaluate_heads(heads, loader(xte, yte, shuffle=False), identity, CPU)
    assert accs[:, 0].max() < 55.0


def test_cosine_schedule_per_head(monkeypatch):
    torch.manual_seed(0)
    heads = eval_linear.LinearHeads(16, 4, 2)
    seen = []
    orig_step = torch.optim.SGD.step

    def step(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return orig_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    x, y = clusters(8)
    eval_linear.train_heads(heads, loader(x, y, batch_size=8), identity, [0.1, 0.4], epochs=2, device=CPU)
    assert len(seen) == 8 and seen[0] == [0.1, 0.4]                  # 32 samples / 8, 2 epochs
    assert seen[4] == pytest.approx([0.05, 0.2])                      # halfway: half
    assert seen[-1][1] == pytest.approx(0.4 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))


class RecordingBar:
    """Stands in for tqdm: iterates, and keeps what set_postfix was given."""
    shown = []

    def __init__(self, iterable, **kw):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kw):
        RecordingBar.shown.append(kw["loss"])


def test_training_reads_the_loss_only_when_shown_and_shows_the_epochs_mean(monkeypatch):
    """No .item() (a GPU sync) per iteration: the running loss stays on the device and is read every show_every
    iterations and at the end of each epoch, where the bar shows the epoch's mean loss per head."""
    reads = []
    orig_item = torch.Tensor.item

    def item(self):                                                   # counts eval_linear's own reads only
        if sys._getframe(1).f_code.co_filename == eval_linear.__file__:   # (the DataLoader draws a seed with one)
            reads.append(1)
        return orig_item(self)

    x, y = clusters(8)                                                # 32 samples, batches of 1: 32 iterations
    lrs = [1e-12, 1e-12]                                              # the heads stay at their init
    for show_every, per_epoch in ((100, 1), (10, 4)):                 # at the epoch's end / at 10, 20, 30 and 32
        torch.manual_seed(0)
        heads = eval_linear.LinearHeads(16, 4, len(lrs))
        init = copy.deepcopy(heads)
        RecordingBar.shown, reads[:] = [], []
        monkeypatch.setattr(eval_linear, "tqdm", RecordingBar)
        monkeypatch.setattr(torch.Tensor, "item", item)
        eval_linear.train_heads(heads, loader(x, y, batch_size=1), identity, lrs, epochs=2, device=CPU,
                                show_every=show_every)
        monkeypatch.undo()
        assert len(reads) == len(RecordingBar.shown) == 2 * per_epoch
        with torch.no_grad():                                         # mean cross-entropy of the heads at init
            expected = sum(F.cross_entropy(h(x), y).item() for h in init.heads) / len(lrs)
        for shown in RecordingBar.shown[per_epoch - 1::per_epoch]:    # each epoch's last: its mean over 32 samples
            assert abs(float(shown) - expected) < 6e-4, (shown, expected)


def test_evaluation_copies_labels_without_blocking(monkeypatch):
    calls = []
    orig_to = torch.Tensor.to

    def to(self, *a, **kw):
        calls.append(kw.get("non_blocking", False))
        return orig_to(self, *a, **kw)

    torch.manual_seed(0)
    heads = eval_linear.LinearHeads(16, 4, 2)
    x, y = clusters(4)
    monkeypatch.setattr(torch.Tensor, "to", to)
    eval_linear.evaluate_heads(heads, loader(x, y, batch_size=8, shuffle=False), identity, CPU)
    assert len(calls) == 4 and all(calls)                            # 2 batches x (images, labels)


def test_features_concatenate_last_cls_tokens_and_pooled_patches():
    torch.manual_seed(0)
    m = vit.vit_tiny(patch_size=8, img_size=16, num_register_tokens=2).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        f4 = eval_linear.linear_features(m, x, 4, False)
        f1p = eval_linear.linear_features(m, x, 1, True)
        out = m.forward_features(x)
        last = m.get_intermediate_layers(x, 4)
    assert f4.shape == (3, 4 * 192) and f1p.shape == (3, 2 * 192)
    torch.testing.assert_close(f4[:, -192:], out["cls"])              # the last block's CLS is model(x)
    torch.testing.assert_close(f4[:, :192], last[0][:, 0])            # the 4th from last block's CLS first
    torch.testing.assert_close(f1p[:, :192], out["cls"])
    torch.testing.assert_close(f1p[:, 192:], out["patches"].mean(1))  # patch tokens only, registers left out


# ----------------------------------------------------------------------------- 1 vs 2 processes

def probe_worker(rank, world_size, port, out):
    """Global batches of 8 samples: rank r takes samples 4r..4r+3 of each; DDP averages the gradients."""
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    x, y = clusters(8, noise=2.0)                                     # 32 samples, not separable: the heads keep moving
    mine = [i for i in range(32) if (i % 8) // (8 // world_size) == rank]
    torch.manual_seed(0)
    heads = eval_linear.LinearHeads(16, 4, 2)
    if world_size > 1:
        heads = torch.nn.parallel.DistributedDataParallel(heads)
    eval_linear.train_heads(heads, loader(x[mine], y[mine], 8 // world_size, shuffle=False), identity, [0.5, 2.0],
                            epochs=2, device=CPU, rank=rank)
    share = list(range(rank, 32, world_size))
    accs = eval_linear.evaluate_heads(heads, loader(x[share], y[share], 5, shuffle=False), identity, CPU, world_size)
    module = heads.module if world_size > 1 else heads
    if rank == 0:
        torch.save((module.state_dict(), accs), out)
    if world_size > 1:
        dist.destroy_process_group()


def test_two_processes_train_the_same_heads_as_one(tmp_path):
    probe_worker(0, 1, None, tmp_path / "one.pt")
    mp.start_processes(probe_worker, args=(2, free_port(), tmp_path / "two.pt"), nprocs=2, start_method="fork")
    (sd1, acc1), (sd2, acc2) = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in sd1:
        torch.testing.assert_close(sd2[k], sd1[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(acc2, acc1)
    torch.manual_seed(0)                                              # and the heads did train
    assert not torch.allclose(eval_linear.LinearHeads(16, 4, 2).state_dict()["heads.0.weight"], sd1["heads.0.weight"])


# ----------------------------------------------------------------------------- checkpoint layouts

@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_layouts_give_the_source_features(layout, layouts):
    files, other = layouts
    path, which, src = files[layout]
    model, _ = eval_linear.load_backbone(path, which)
    assert eval_linear.arch_name(model) == "vit_tiny/8" and model.num_register_tokens == src.num_register_tokens
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        f = eval_linear.linear_features(model, x, 4, True)
        torch.testing.assert_close(f, eval_linear.linear_features(src, x, 4, True))
        assert not torch.allclose(f, eval_linear.linear_features(other, x, 4, True))


# ----------------------------------------------------------------------------- the script

def test_main_end_to_end(layouts, tmp_path, capsys):
    path = layouts[0]["own_teacher"][0]
    out = tmp_path / "linear.json"
    eval_linear.main(eval_linear.get_args(["--checkpoint", path, *SMALL, "--compare_init", "--output_json", str(out)]))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("linear (")]
    assert len(lines) == 2 and "vit_tiny/8 teacher" in lines[0] and "random init, seed 0" in lines[1]
    res = json.loads(out.read_text())
    assert res["n_last_blocks"] == 4 and res["avgpool_patchtokens"] is False   # DINO's ViT-S defaults for tiny
    assert res["num_train"] == res["num_val"] == 40 and res["num_classes"] == 10 and res["batch_size"] == 20
    assert res["iteration"] == 10                                     # the checkpoint's
    for r in (res, res["init"]):
        assert len(r["per_lr"]) == len(eval_linear.DINOV2_LRS)
        assert all(0 <= p["top1"] <= p["top5"] <= 100 for p in r["per_lr"])
        best = max(r["per_lr"], key=lambda p: p["top1"])
        assert r["top1"] == best["top1"] and r["best_lr"] in eval_linear.DINOV2_LRS
        assert r["per_lr"][0]["lr_scaled"] == pytest.approx(1e-5 * 20 / 256)   # linear scaling by the batch
    assert 0 <= res["top1"] <= res["top5"] <= 100
    assert res["init"]["floor"].startswith("--compare_init") and res["init"]["seed"] == 0
    assert "layerscale" not in res["init"]                            # its blocks have none


def test_init_layerscale_sets_the_probed_floor(dinov2_like, tmp_path, capsys, monkeypatch):
    built = []
    orig_twin = eval_linear.random_twin
    monkeypatch.setattr(eval_linear, "random_twin", lambda *a: built.append(orig_twin(*a)) or built[-1])
    out = tmp_path / "linear.json"
    eval_linear.main(eval_linear.get_args(["--checkpoint", dinov2_like, *SMALL, "--lrs", "0.1", "--compare_init",
                                           "--init_layerscale", "0.1", "--output_json", str(out)]))
    assert "random init, seed 0, layerscale 0.1 (--init_layerscale)" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["init"]["layerscale"] == 0.1 and res["init"]["layerscale_from"] == "--init_layerscale"
    gammas = torch.cat([m.gamma.flatten() for m in built[0].modules() if isinstance(m, vit.LayerScale)])
    assert len(gammas) == 12 * 2 * 192 and (gammas == 0.1).all()


def assert_clean_error(returncode, stderr, phrase):
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, stderr


def test_bad_input_from_the_command_line(layouts, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "empty" / split).mkdir(parents=True)
    flat = tmp_path / "flat"                                           # class folders, no train/ and val/
    write_tree(flat, np.zeros((4, 4, 4, 3), dtype=np.uint8), [0, 1, 0, 1])
    cases = [(["--checkpoint", str(tmp_path / "nope.pth")], "does not exist"),
             (["--checkpoint", layouts[0]["bare"][0], "--data", str(tmp_path / "empty")], "no class sub-folders"),
             (["--checkpoint", layouts[0]["bare"][0], "--data", str(flat)],
              f"--data {flat} has no train/ and val/ (or test/) sub-folders, so its images would be evaluated against "
              f"themselves: put them in {flat}/train/<class>/ and {flat}/val/<class>/")]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval_linear.py"), *argv, *SMALL[2:]], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv, _ in cases]
    for p, (_, phrase) in zip(procs, cases):
        _, stderr = p.communicate(timeout=300)
        assert_clean_error(p.returncode, stderr, phrase)


@pytest.mark.parametrize("case", ["not a ViT", "crop not divisible", "too many blocks", "bad lr", "one class",
                                  "val is train", "init_layerscale alone", "init_layerscale without layerscale"])
def test_bad_input_in_process(case, layouts, dinov2_like, tmp_path):
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "resnet.pth")
    good = layouts[0]["own_teacher"][0]
    one, linked = split_trees(tmp_path)
    argv, phrase = {"not a ViT": (["--checkpoint", str(tmp_path / "resnet.pth"), *SMALL], "no ViT backbone"),
                    "crop not divisible": (["--checkpoint", good, *SMALL, "--crop_size", "12"],
                                           "not divisible by the patch size 8"),
                    "too many blocks": (["--checkpoint", good, *SMALL, "--n_last_blocks", "13"], "between 1 and"),
                    "bad lr": (["--checkpoint", good, *SMALL, "--lrs", "0.1", "0"], "must be positive"),
                    "one class": (["--checkpoint", good, *SMALL, "--data", one],
                                  f"--data {one} has a single class ('cat')"),
                    "val is train": (["--checkpoint", good, *SMALL, "--data", linked],
                                     "train/ and val/ are the same folder"),
                    "init_layerscale alone": (["--checkpoint", dinov2_like, *SMALL, "--init_layerscale", "0.1"],
                                              "add --compare_init"),
                    "init_layerscale without layerscale": (["--checkpoint", good, *SMALL, "--compare_init",
                                                            "--init_layerscale", "0.1"], "blocks have no layerscale")}[case]
    with pytest.raises(SystemExit) as e:
        eval_linear.cli(argv)
    assert_clean_error(1, str(e.value.code), phrase)
