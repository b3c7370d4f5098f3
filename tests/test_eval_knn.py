"""eval_knn.py: the weighted vote by hand, chunking, top-5 corner cases, ordered gathering over 2 processes,
every checkpoint layout, the --compare_init floor and its layerscale, the raw-pixel floor against numpy, the script
end to end, bad input (folders without splits, one class)."""
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import data
import eval_knn
import vit
from PIL import Image
from dist_step import BF16_VS_FLOAT32, free_port, needs_native_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--data", "synthetic:30", "--resize_size", "18", "--crop_size", "16", "--num_workers", "0",
         "--batch_size_per_gpu", "16"]


# ----------------------------------------------------------------------------- the k-NN classifier

def clusters(n_per_class, num_classes, dim=32, noise=0.05, seed=0):
    """Gaussian clusters around fixed random centres; seed draws the noise."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed)), labels


def test_separated_clusters_are_classified_perfectly():
    xtr, ytr = clusters(20, 6)
    xte, yte = clusters(10, 6, seed=1)                                   # same centres, new noise
    accs = eval_knn.knn_classify(xtr, ytr, xte, yte, k_list=[1, 5, 20], T=0.07, num_classes=6)
    assert accs == {1: (100.0, 100.0), 5: (100.0, 100.0), 20: (100.0, 100.0)}
    # a label permutation of the test set is detected: 0 %
    accs = eval_knn.knn_classify(xtr, ytr, xte, (yte + 1) % 6, k_list=[20], num_classes=6)
    assert accs[20][0] == 0.0


def test_hand_worked_vote():
    # 4 unit train vectors in 2-D; the query q = (1, 0) has cosines 1, 0.8, 0.6, 0 to them
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.0]])
    sims = torch.tensor([[1.0, 0.8, 0.6]], dtype=torch.float64)           # its 3 nearest: train 0, 1, 2
    votes = eval_knn.weighted_votes(sims, labels[:3][None], 0.5, 2)
    # class 0: exp(1 / 0.5) = 7.389; class 1: exp(0.8 / 0.5) + exp(0.6 / 0.5) = 4.953 + 3.320 = 8.273
    torch.testing.assert_close(votes, torch.tensor([[math.exp(2.0), math.exp(1.6) + math.exp(1.2)]], dtype=torch.float64))
    assert votes[0, 1] > votes[0, 0]                                     # two fair neighbours outvote one close one
    # at T = 0.1 the closest dominates: exp(10) = 22026 > exp(8) + exp(6) = 3384
    votes = eval_knn.weighted_votes(sims, labels[:3][None], 0.1, 2)
    torch.testing.assert_close(votes, torch.tensor([[math.exp(10.0), math.exp(8.0) + math.exp(6.0)]], dtype=torch.float64))
    # the same through knn_classify (query of class 1): right at T = 0.5, wrong at T = 0.1; 2 classes so top-5 is
    # "class 1 got a vote"; with k = 1 only train 0 (class 0) votes, so not even top-5
    y = torch.tensor([1])
    assert eval_knn.knn_classify(train, labels, q, y, [3], T=0.5, num_classes=2) == {3: (100.0, 100.0)}
    assert eval_knn.knn_classify(train, labels, q, y, [3], T=0.1, num_classes=2) == {3: (0.0, 100.0)}
    assert eval_knn.knn_classify(train, labels, q, y, [1], T=0.5, num_classes=2) == {1: (0.0, 0.0)}
    # features need not be normalised by the caller: cosines are taken
    assert eval_knn.knn_classify(3 * train, labels, 5 * q, y, [3], T=0.5, num_classes=2) == {3: (100.0, 100.0)}


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(300, 16, generator=g), torch.randint(0, 10, (300,), generator=g)
    xte, yte = torch.randn(77, 16, generator=g), torch.randint(0, 10, (77,), generator=g)
    xte[:40] = xtr[:40] + 0.3 * torch.randn(40, 16, generator=g)        # some test points with a true neighbour
    yte[:40] = ytr[:40]
    ks = [1, 3, 10, 20, 100, 200]
    full = eval_knn.knn_classify(xtr, ytr, xte, yte, ks, num_classes=10, chunk_size=10_000)
    for chunk in (1, 7, 32):
        assert eval_knn.knn_classify(xtr, ytr, xte, yte, ks, num_classes=10, chunk_size=chunk) == full
    assert full[1][0] > 40                                              # not a trivial all-wrong case
    assert all(0 <= t1 <= t5 <= 100 for t1, t5 in full.values())


def test_top5_with_few_neighbours_or_classes_and_k_beyond_the_train_set():
    xtr, ytr = clusters(3, 10, noise=1.0)
    xte, yte = clusters(3, 10, noise=1.0, seed=1)
    accs = eval_knn.knn_classify(xtr, ytr, xte, yte, [1, 2, 30, 31, 500], num_classes=10)
    assert accs[1][0] == accs[1][1]                                      # one neighbour: one voted class
    assert accs[2][1] >= accs[2][0]
    assert accs[31] == accs[500] == accs[30]                             # k > 30 train samples: all of them vote
    # 3 classes (< 5): top-5 = "the label got a vote"; every class is among 30 neighbours, so 100
    accs = eval_knn.knn_classify(xtr, ytr % 3, xte, yte % 3, [30], num_classes=3)
    assert accs[30][1] == 100.0


# ----------------------------------------------------------------------------- feature extraction

class IndexImages(torch.utils.data.Dataset):
    """Item i: an 'image' filled with i, label i % 3."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        return torch.full((3, 2, 2), float(i)), i % 3


class ReadIndex(nn.Module):
    def forward(self, x):                                                # (B, 3, 2, 2) -> (B, 2)
        return torch.stack([x[:, 0, 0, 0], -2 * x[:, 0, 0, 0]], dim=1)


def extract_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    f, y = eval_knn.extract_features(ReadIndex(), IndexImages(), torch.device("cpu"), batch_size=2,
                                     rank=rank, world_size=world_size)
    torch.save((f, y), f"{out}.{rank}")
    dist.destroy_process_group()


def test_extraction_copies_images_and_labels_without_blocking(monkeypatch):
    """Labels come off pinned memory with non_blocking=True, as the images do: no host sync per batch."""
    calls = []
    orig_to = torch.Tensor.to

    def to(self, *a, **kw):
        calls.append(kw.get("non_blocking", False))
        return orig_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", to)
    f, y = eval_knn.extract_features(ReadIndex(), IndexImages(), torch.device("cpu"), batch_size=3)
    assert len(calls) == 6 and all(calls)                               # 3 batches x (images, labels)
    assert y.tolist() == [i % 3 for i in range(7)]


def test_distributed_extraction_keeps_dataset_order(tmp_path):
    single = eval_knn.extract_features(ReadIndex(), IndexImages(), torch.device("cpu"), batch_size=3)
    index = torch.arange(7.0)
    torch.testing.assert_close(single[0], torch.stack([index, -2 * index], 1))
    assert single[1].tolist() == [i % 3 for i in range(7)]
    out = str(tmp_path / "feats")
    mp.start_processes(extract_worker, args=(2, free_port(), out), nprocs=2, start_method="fork")
    for rank in range(2):                                                # 7 images on 2 processes: 4 + 3, no padding
        f, y = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(f, single[0], rtol=0, atol=0)
        assert torch.equal(y, single[1])


# ----------------------------------------------------------------------------- checkpoint layouts

LAYOUTS = ["own_teacher", "own_student", "bare", "dino_full", "dinov2_chunked"]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return vit.vit_tiny(patch_size=8, img_size=16, **kw).eval()


def layout_checkpoint(layout, src, other, src_v2):
    """(checkpoint dict in one supported layout, which network to ask for, the source model it holds)."""
    sd, sd_other = src.state_dict(), other.state_dict()
    if layout in ("own_teacher", "own_student"):                 # this project's training scripts
        which = layout.split("_")[1]
        nets = {"teacher": sd, "student": sd_other} if which == "teacher" else {"teacher": sd_other, "student": sd}
        ckpt = {k: {**{f"backbone.{n}": v for n, v in s.items()}, "head.mlp.0.weight": torch.zeros(8, 192)}
                for k, s in nets.items()}
        ckpt.update(optimizer={}, epoch=1, iteration=10, args={"arch": "vit_tiny", "patch_size": 8, "seed": 0})
        return ckpt, which, src
    if layout == "bare":                                          # hub files: dino_deitsmall16_pretrain.pth
        return {k: v for k, v in sd.items() if k != "mask_token"}, "teacher", src
    if layout == "dino_full":                                     # DINO's checkpoint.pth, DDP prefixes in the student
        ckpt = {"teacher": {**{f"backbone.{n}": v for n, v in sd.items() if n != "mask_token"},
                            "head.last_layer.weight_g": torch.ones(16, 1)},
                "student": {f"module.backbone.{n}": v for n, v in sd_other.items()}, "epoch": 100,
                "dino_loss": {"center": torch.zeros(1, 16)}}
        return ckpt, "teacher", src
    ckpt = {"teacher": {"ibot_head.mlp.0.weight": torch.zeros(8, 192)}, "iteration": 5}   # DINOv2: FSDP block chunks
    for n, v in src_v2.state_dict().items():
        if n.startswith("blocks."):
            i = int(n.split(".")[1])
            n = f"blocks.{i // 3}.{i}." + n.split(".", 2)[2]
        ckpt["teacher"][f"backbone.{n}"] = v
    return ckpt, "teacher", src_v2


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """{layout: (path, which, source model)} and the other network of the two-network files."""
    tmp = tmp_path_factory.mktemp("layouts")
    src, other, src_v2 = tiny(0), tiny(1), tiny(2, num_register_tokens=4, layerscale=0.1)
    files = {}
    for layout in LAYOUTS:
        ckpt, which, model = layout_checkpoint(layout, src, other, src_v2)
        torch.save(ckpt, tmp / f"{layout}.pth")
        files[layout] = (str(tmp / f"{layout}.pth"), which, model)
    return files, other


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_layouts_give_the_source_features(layout, layouts):
    files, other = layouts
    path, which, src = files[layout]
    model, args = eval_knn.load_backbone(path, which)
    assert eval_knn.arch_name(model) == "vit_tiny/8"
    assert model.num_register_tokens == src.num_register_tokens
    images = torch.utils.data.TensorDataset(torch.randn(5, 3, 16, 16), torch.arange(5))
    f, y = eval_knn.extract_features(model, images, torch.device("cpu"), batch_size=2, bf16=False)
    torch.testing.assert_close(f, src(images.tensors[0]))
    assert torch.equal(y, torch.arange(5))
    assert not torch.allclose(f, other(images.tensors[0]))             # not the other network of the file
    assert args.get("seed", 0) == 0


@needs_native_bf16
def test_bf16_extraction_runs_the_backbone_in_bf16_and_returns_float32(layouts):
    """--bf16 (the default) on a CPU that computes bf16 natively: the backbone under bf16 autocast, as on a GPU;
    the features come back float32, within bf16 precision of float32 extraction (8 units of 2^-8 relative to each
    feature's norm, tests/dist_step.py) and not equal to it."""
    model, _ = eval_knn.load_backbone(layouts[0][LAYOUTS[0]][0], layouts[0][LAYOUTS[0]][1])
    images = torch.utils.data.TensorDataset(torch.randn(5, 3, 16, 16), torch.arange(5))
    low, _ = eval_knn.extract_features(model, images, torch.device("cpu"), batch_size=2)
    ref, _ = eval_knn.extract_features(model, images, torch.device("cpu"), batch_size=2, bf16=False)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert ((low - ref).norm(dim=1) <= BF16_VS_FLOAT32 * ref.norm(dim=1)).all()


def test_student_asked_of_a_file_without_one(layouts, tmp_path):
    path = tmp_path / "teacher_only.pth"
    torch.save({"teacher": torch.load(layouts[0]["dino_full"][0])["teacher"]}, path)
    with pytest.raises(vit.CheckpointError, match="no 'student' network"):
        eval_knn.load_backbone(str(path), "student")


@pytest.mark.parametrize("method", ["simdino", "simdinov2", "dino", "dinov2"])
def test_compare_init_rebuilds_the_training_runs_initial_network(method, tmp_path):
    """A training script seeds, then builds student and teacher: --compare_init gets that teacher back
    (registers, layerscale and its initial value, seed all read from the checkpoint)."""
    script = pytest.importorskip(method)
    argv = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16", "--seed", "5",
            "--proj_hidden_dim", "32", "--proj_dim", "8"] + (["--out_dim", "32"] if "dino" == method[:4] else [])
    args = script.get_args(argv)
    torch.manual_seed(5)
    student, teacher = script.build_networks(args)
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "args": vars(args)}, tmp_path / "c.pth")
    model, ckpt_args = eval_knn.load_backbone(str(tmp_path / "c.pth"))
    seed, layerscale, source = eval_knn.init_settings(eval_knn.get_args([]), ckpt_args)
    twin = eval_knn.random_twin(model, seed, layerscale)
    assert seed == 5 and twin.num_register_tokens == getattr(args, "num_register_tokens", 0)
    if hasattr(args, "layerscale"):                                     # dinov2.py 1e-5, simdinov2.py 0.1
        assert (layerscale, source) == (args.layerscale, "the run's own")
    else:                                                               # no layerscale blocks: unused
        assert (layerscale, source) == (0.1, "default: SimDINOv2's") and not eval_knn.has_layerscale(twin)
    assert (twin.interpolate_offset, twin.interpolate_antialias) == (args.interpolate_offset, args.interpolate_antialias)
    for n, v in teacher.backbone.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[n], v, rtol=0, atol=0, msg=n)


def layerscales(model):
    return torch.cat([m.gamma.detach().flatten() for m in model.modules() if isinstance(m, vit.LayerScale)])


def test_init_layerscale_sets_the_floor_networks_layerscale_and_the_default_stays_the_runs_own():
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=8, img_size=16, num_register_tokens=4, layerscale=1e-5).eval()
    dinov2_args = {"seed": 3, "layerscale": 1e-5}                       # what dinov2.py records
    # default: the run's own 1e-5 (the floor decided by rounding), as before the flag
    seed, ls, source = eval_knn.init_settings(eval_knn.get_args(["--compare_init"]), dinov2_args)
    assert (seed, ls, source) == (3, 1e-5, "the run's own")
    assert torch.equal(layerscales(eval_knn.random_twin(model, seed, ls)), torch.full((12 * 2 * 192,), 1e-5))
    # --init_layerscale 0.1: every layerscale weight of the twin (2 per block) is 0.1, the rest as the default's
    args = eval_knn.get_args(["--compare_init", "--init_layerscale", "0.1"])
    seed, ls, source = eval_knn.init_settings(args, dinov2_args)
    assert (seed, ls, source) == (3, 0.1, "--init_layerscale")
    twin, default_twin = eval_knn.random_twin(model, seed, ls), eval_knn.random_twin(model, 3, 1e-5)
    assert torch.equal(layerscales(twin), torch.full((12 * 2 * 192,), 0.1))
    for n, v in twin.state_dict().items():
        if ".ls" not in n:
            assert torch.equal(v, default_twin.state_dict()[n]), n
    # a file that records no layerscale (a released one): 0.1, said so
    assert eval_knn.init_settings(eval_knn.get_args([]), {})[1:] == (0.1, "default: SimDINOv2's")
    name, fields = eval_knn.init_floor(model, 3, 0.1, "--init_layerscale")
    assert name == "vit_tiny/8 random init, seed 3, layerscale 0.1 (--init_layerscale)"
    assert fields["layerscale"] == 0.1 and fields["layerscale_from"] == "--init_layerscale"
    plain = vit.vit_tiny(patch_size=8, img_size=16)                     # no layerscale: nothing said about it
    assert eval_knn.init_floor(plain, 0, 0.1, "x") == ("vit_tiny/8 random init, seed 0",
                                                       {"seed": 0, "floor": fields["floor"]})


@pytest.fixture(scope="module")
def dinov2_like(tmp_path_factory):
    """A DINOv2-style file: 4 registers, layerscale 1e-5 at init, the run's args recording it."""
    path = tmp_path_factory.mktemp("dinov2") / "checkpoint.pth"
    m = tiny(7, num_register_tokens=4, layerscale=1e-5)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in m.state_dict().items()},
                "args": {"seed": 0, "layerscale": 1e-5, "arch": "vit_tiny", "patch_size": 8}}, path)
    return str(path)


def test_dinov2_floor_at_its_own_layerscale_is_flagged_and_init_layerscale_gives_another(dinov2_like, tmp_path,
                                                                                         capsys):
    out = tmp_path / "default.json"
    eval_knn.main(eval_knn.get_args(["--checkpoint", dinov2_like, *SMALL, "--compare_init", "--output_json", str(out)]))
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["init"]["layerscale"] == 1e-5 and res["init"]["layerscale_from"] == "the run's own"
    assert "rounding" in res["init"]["note"]                            # every image's feature nearly the same
    assert "random init, seed 0, layerscale 1e-05 (the run's own)" in printed
    assert "--init_layerscale 0.1 gives a floor that is not" in printed
    out = tmp_path / "ls01.json"
    eval_knn.main(eval_knn.get_args(["--checkpoint", dinov2_like, *SMALL, "--compare_init", "--init_layerscale", "0.1",
                                     "--output_json", str(out)]))
    printed = capsys.readouterr().out
    ls01 = json.loads(out.read_text())
    assert ls01["init"]["layerscale"] == 0.1 and ls01["init"]["layerscale_from"] == "--init_layerscale"
    assert "note" not in ls01["init"] and "random init, seed 0, layerscale 0.1 (--init_layerscale)" in printed
    assert ls01["knn"] == res["knn"]                                    # the checkpoint's own line is untouched
    assert ls01["init"]["knn"] != res["init"]["knn"]


def test_near_identical_features_are_told_apart_from_ordinary_ones():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    assert eval_knn.near_identical(base + 1e-6 * torch.randn(50, 64, generator=g))
    assert not eval_knn.near_identical(base + 0.1 * torch.randn(50, 64, generator=g))
    assert not eval_knn.near_identical(base)                            # a single row says nothing


# ----------------------------------------------------------------------------- the raw-pixel floor

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def write_tree(root, images, labels, classes=("a", "b", "c")):
    """root/<class>/<i>.png, lossless, from (n, H, W, 3) uint8 images."""
    for i, (img, y) in enumerate(zip(images, labels)):
        os.makedirs(root / classes[y], exist_ok=True)
        Image.fromarray(img).save(root / classes[y] / f"{i:02d}.png")


def numpy_knn(train_x, train_y, test_x, test_y, k, T, num_classes):
    """The DINO vote written out in numpy: cosine to every train vector, the k largest vote exp(sim / T) for their
    label. -> (top-1 %, 'label got a vote' %: top-5 with fewer than 5 classes)."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    top1 = voted = 0
    for i, sims in enumerate(b @ a.T):
        votes = np.zeros(num_classes)
        for j in np.argsort(-sims)[:k]:
            votes[train_y[j]] += np.exp(sims[j] / T)
        top1 += votes.argmax() == test_y[i]
        voted += votes[test_y[i]] > 0
    return 100 * top1 / len(b), 100 * voted / len(b)


def test_raw_pixel_floor_is_knn_on_the_normalised_pixels(tmp_path, capsys):
    rng = np.random.default_rng(282)
    train, test = rng.integers(0, 256, (9, 2, 2, 3), dtype=np.uint8), rng.integers(0, 256, (6, 2, 2, 3), dtype=np.uint8)
    train_y, test_y = np.arange(9) % 3, np.arange(6) % 3
    write_tree(tmp_path / "tree" / "train", train, train_y)
    write_tree(tmp_path / "tree" / "test", test, test_y)               # test/ stands in for val/
    ks, T = [1, 3, 9], 0.5
    eval_knn.main(eval_knn.get_args(["--raw_pixels", "--data", str(tmp_path / "tree"), "--resize_size", "2",
                                     "--crop_size", "2", "--nb_knn", *map(str, ks), "--temperature", str(T),
                                     "--num_workers", "0", "--output_dir", str(tmp_path)]))
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "raw_pixels_knn.json").read_text())   # the default file name
    assert "raw-pixel floor" in res["floor"] and res["features"] == "raw_pixels" and res["checkpoint"] is None
    assert res["feature_dim"] == 12 and res["num_train"] == 9 and res["num_val"] == 6 and res["num_classes"] == 3
    assert "k-NN (raw-pixel floor, no network: 12 normalised pixel values (3 x 2 x 2))" in printed

    def pixels(x, normalise=True):                                      # (n, 2, 2, 3) uint8 -> (n, 12)
        x = x / 255.0
        return ((x - MEAN) / STD if normalise else x).reshape(len(x), -1)

    expected = {k: numpy_knn(pixels(train), train_y, pixels(test), test_y, k, T, 3) for k in ks}
    assert np.array([expected[k] for k in ks]) == pytest.approx(np.array([(50, 50), (250 / 3, 250 / 3), (200 / 3, 100)]))
    for k in ks:
        assert (res["knn"][str(k)]["top1"], res["knn"][str(k)]["top5"]) == pytest.approx(expected[k]), k
    # the data can tell the protocol's parts apart: unnormalised pixels, or unweighted votes, give other figures
    assert any(numpy_knn(pixels(train, False), train_y, pixels(test, False), test_y, k, T, 3) != expected[k] for k in ks)
    assert any(numpy_knn(pixels(train), train_y, pixels(test), test_y, k, 1e6, 3) != expected[k] for k in ks)


def write_fake_cifar10(root, n_train=20, n_test=6, seed=0):
    """ROOT/cifar-10-batches-py/ as torchvision keeps it, with a few random images per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train // 5
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_raw_pixels_on_cifar10_files(tmp_path):
    write_fake_cifar10(tmp_path)
    out = tmp_path / "raw.json"
    eval_knn.main(eval_knn.get_args(["--raw_pixels", "--data", f"cifar10:{tmp_path}", "--resize_size", "32",
                                     "--crop_size", "32", "--nb_knn", "1", "--num_workers", "0",
                                     "--output_json", str(out)]))
    res = json.loads(out.read_text())
    assert res["feature_dim"] == 3072 and res["num_train"] == 20 and res["num_val"] == 6 and res["num_classes"] == 10


# ----------------------------------------------------------------------------- the script

def test_main_end_to_end_with_compare_init_and_saved_features(layouts, tmp_path, capsys):
    path = layouts[0]["own_teacher"][0]
    out = tmp_path / "knn.json"
    eval_knn.main(eval_knn.get_args(["--checkpoint", path, *SMALL, "--compare_init", "--output_json", str(out),
                                     "--save_features", str(tmp_path / "f")]))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("k-NN")]
    assert len(lines) == 2 and "vit_tiny/8 teacher" in lines[0] and "random init, seed 0" in lines[1]
    assert lines[0].split(": ", 1)[1].startswith("k=20 top-1 ")
    res = json.loads(out.read_text())
    assert res["backbone"] == "vit_tiny/8" and res["num_train"] == res["num_val"] == 30 and res["num_classes"] == 10
    assert res["iteration"] == 10                                       # the checkpoint's: plot_runs.py's x
    assert set(res["knn"]) == set(res["init"]["knn"]) == {"10", "20", "100", "200"}
    for accs in (res["knn"], res["init"]["knn"]):
        assert all(0 <= a["top1"] <= a["top5"] <= 100 for a in accs.values())
    assert res["knn"]["100"] == res["knn"]["200"]                       # both clamped to the 30 train images
    # the saved features give the same numbers without the backbone; default JSON next to them
    eval_knn.main(eval_knn.get_args(["--load_features", str(tmp_path / "f")]))
    again = json.loads((tmp_path / "f" / "features_knn.json").read_text())
    assert again["knn"] == res["knn"]
    init = torch.load(tmp_path / "f" / "knn_features_init.pth")
    assert init["train_features"].shape == (30, 192) and init["test_labels"].tolist() == [i % 10 for i in range(30)]


def test_several_checkpoints_read_the_images_once_and_equal_one_at_a_time(tmp_path, monkeypatch, capsys):
    """Two checkpoints of one run (seed 0) and their shared --compare_init floor: 3 networks, each image decoded
    once; every JSON file equals the one a run of its checkpoint alone writes; --cache_gb 0 decodes per network."""
    paths = []
    for seed in (0, 1):
        paths.append(str(tmp_path / f"checkpoint000{seed + 1}.pth"))
        torch.save({"teacher": {f"backbone.{k}": v for k, v in tiny(seed).state_dict().items()},
                    "args": {"seed": 0}}, paths[-1])
    alone, KS = [], ["--nb_knn", "1", "2", "5"]                         # small k: the two networks' figures differ
    for i, path in enumerate(paths):
        out = tmp_path / f"alone{i}.json"
        eval_knn.main(eval_knn.get_args(["--checkpoint", path, *SMALL, *KS, "--compare_init", "--output_json", str(out)]))
        alone.append(json.loads(out.read_text()))
    assert alone[0]["knn"] != alone[1]["knn"] and alone[0]["init"] == alone[1]["init"]
    assert alone[0]["iteration"] is None                                # these files record none
    reads = []
    read = data.SyntheticShapes.__getitem__
    monkeypatch.setattr(data.SyntheticShapes, "__getitem__", lambda self, i: reads.append(i) or read(self, i))
    for cache_gb, decodes in (("4", 1), ("0", 3)):
        reads.clear()
        capsys.readouterr()
        eval_knn.main(eval_knn.get_args(["--checkpoint", *paths, *SMALL, *KS, "--compare_init", "--cache_gb", cache_gb]))
        printed = capsys.readouterr().out
        assert len(reads) == decodes * 60                               # 30 train + 30 val images per decoding
        assert printed.count("random init, seed 0") == 2                # each file has its floor line
        assert ("decoded again for each of the 3 networks" in printed) == (cache_gb == "0")
        for path, expected in zip(paths, alone):
            together = json.loads(open(path.replace(".pth", "_knn.json")).read())   # beside its checkpoint
            assert together == expected


def test_avgpool_patchtokens_feature_is_cls_and_mean_patch_of_the_checkpoint_and_its_floor(tmp_path, capsys):
    """[CLS, mean patch] (registers left out) of the trained network and of its --compare_init twin, voted on as DINO
    does; the CLS-only result beside it is not overwritten."""
    src = tiny(3, num_register_tokens=2)
    path = tmp_path / "checkpoint0001.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "args": {"seed": 5}}, path)
    KS = ["--nb_knn", "1", "3", "7", "--temperature", "0.1", "--no-bf16"]      # features compared with float32's
    eval_knn.main(eval_knn.get_args(["--checkpoint", str(path), *SMALL, *KS, "--compare_init"]))
    cls_only = json.loads((tmp_path / "checkpoint0001_knn.json").read_text())
    capsys.readouterr()
    eval_knn.main(eval_knn.get_args(["--checkpoint", str(path), *SMALL, *KS, "--compare_init", "--avgpool_patchtokens",
                                     "--save_features", str(tmp_path / "f")]))
    assert "vit_tiny/8 teacher, " + str(path) + ", [CLS, mean patch]" in capsys.readouterr().out
    res = json.loads((tmp_path / "checkpoint0001_knn_avgpool.json").read_text())
    assert res["features"] == "cls+avgpool_patchtokens" and res["feature_dim"] == 384
    assert json.loads((tmp_path / "checkpoint0001_knn.json").read_text()) == cls_only and cls_only["features"] == "cls"
    transform = eval_knn.eval_transform(18, 16)
    splits = [data.build_dataset("synthetic:30", transform, s) for s in ("train", "val")]
    for label, net in (("", src), ("_init", eval_knn.random_twin(src, 5))):
        saved = torch.load(tmp_path / "f" / f"knn_features{label}.pth")
        for split, images in zip(("train", "test"), splits):
            x = torch.stack([images[i][0] for i in range(len(images))])
            with torch.no_grad():
                t = net.forward_features(x)
            by_hand = torch.cat([t["cls"], t["patches"].mean(1)], dim=1)            # (30, 384): no register tokens
            torch.testing.assert_close(saved[f"{split}_features"], by_hand)
            assert not torch.allclose(by_hand, torch.cat([t["cls"], torch.cat([t["registers"], t["patches"]], 1)
                                                          .mean(1)], dim=1))
        f, y = saved["train_features"].numpy(), saved["train_labels"].numpy()
        expected = {k: numpy_knn(f, y, saved["test_features"].numpy(), saved["test_labels"].numpy(), k, 0.1, 10)[0]
                    for k in (1, 3, 7)}
        knn = res["init"]["knn"] if label else res["knn"]
        assert {k: knn[str(k)]["top1"] for k in (1, 3, 7)} == pytest.approx(expected)
    assert res["knn"] != cls_only["knn"] or res["init"]["knn"] != cls_only["init"]["knn"]   # another feature


def test_decoded_images_keep_the_count_of_unreadable_ones(tmp_path):
    write_tree(tmp_path / "train", np.zeros((4, 4, 4, 3), dtype=np.uint8), [0, 1, 0, 1])
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not an image")
    images = data.build_dataset(str(tmp_path), eval_knn.eval_transform(4, 4), "train")
    decoded = eval_knn.decode_once(images, torch.device("cpu"), batch_size=2)
    assert len(decoded) == 5 and decoded.num_skipped == 1 and decoded.classes == ["a", "b"]
    f, y = eval_knn.extract_features(nn.Flatten(), decoded, torch.device("cpu"), batch_size=2)
    again = eval_knn.extract_features(nn.Flatten(), images, torch.device("cpu"), batch_size=2)
    assert torch.equal(f, again[0]) and torch.equal(y, again[1])


def assert_clean_error(returncode, stderr, phrase):
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, stderr


def test_bad_input_from_the_command_line(layouts, tmp_path):
    """Run as a user does (each run pays for importing torch, so they run side by side)."""
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    for split in ("train", "val"):
        (tmp_path / "empty" / split).mkdir(parents=True)
    flat = tmp_path / "flat"                                             # class folders, no train/ and val/
    write_tree(flat, np.zeros((4, 4, 4, 3), dtype=np.uint8), [0, 1, 0, 1])
    cases = [(["--checkpoint", str(tmp_path / "nope.pth")], "does not exist"),
             (["--checkpoint", str(tmp_path / "resnet.pth")], "no ViT backbone"),
             (["--checkpoint", layouts[0]["bare"][0], "--data", str(tmp_path / "empty")], "no class sub-folders"),
             (["--checkpoint", layouts[0]["bare"][0], "--data", str(flat)],
              f"--data {flat} has no train/ and val/ (or test/) sub-folders, so its images would be evaluated against "
              f"themselves: put them in {flat}/train/<class>/ and {flat}/val/<class>/"),
             (["--raw_pixels", "--data", str(flat)], "has no train/ and val/ (or test/) sub-folders")]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval_knn.py"), *argv, *SMALL[2:]], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv, _ in cases]
    for p, (_, phrase) in zip(procs, cases):
        _, stderr = p.communicate(timeout=300)
        assert_clean_error(p.returncode, stderr, phrase)


def split_trees(tmp_path):
    """A tree of one class only, and one whose val/ is a link to its train/."""
    img = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    for split in ("train", "val"):
        write_tree(tmp_path / "one" / split, img, [0, 0], classes=("cat",))
    write_tree(tmp_path / "linked" / "train", img, [0, 1])
    os.symlink(tmp_path / "linked" / "train", tmp_path / "linked" / "val")
    return str(tmp_path / "one"), str(tmp_path / "linked")


BAD_CASES = ["unknown size", "crop not divisible", "no checkpoint", "crop > resize", "one class", "val is train",
             "raw pixels with a checkpoint", "raw pixels with compare_init", "init_layerscale alone",
             "init_layerscale without layerscale", "init_layerscale 0", "two checkpoints, one JSON",
             "a checkpoint twice", "the second checkpoint unknown", "cache_gb negative", "avgpool with raw pixels",
             "avgpool with saved features"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_in_process(case, layouts, dinov2_like, tmp_path, capsys):
    odd = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=2)   # no known size
    torch.save({"teacher": {f"backbone.{k}": v for k, v in odd.state_dict().items()}}, tmp_path / "odd.pth")
    good = layouts[0]["own_teacher"][0]
    one, linked = split_trees(tmp_path)
    argv, phrase = {"unknown size": (["--checkpoint", str(tmp_path / "odd.pth"), *SMALL], "width 64 and depth 2"),
                    "crop not divisible": (["--checkpoint", good, *SMALL, "--crop_size", "12"],
                                           "not divisible by the patch size 8"),
                    "no checkpoint": (SMALL, "pass --checkpoint"),
                    "crop > resize": (["--checkpoint", good, *SMALL, "--crop_size", "24"], "larger than --resize_size"),
                    "one class": (["--checkpoint", good, *SMALL, "--data", one],
                                  f"--data {one} has a single class ('cat'): accuracy over one class is 100 %"),
                    "val is train": (["--raw_pixels", *SMALL, "--data", linked], "train/ and val/ are the same folder"),
                    "raw pixels with a checkpoint": (["--raw_pixels", "--checkpoint", good, *SMALL],
                                                     "--raw_pixels evaluates the pixels themselves, without a "
                                                     "network: drop --checkpoint"),
                    "raw pixels with compare_init": (["--raw_pixels", "--compare_init", *SMALL], "drop --compare_init"),
                    "init_layerscale alone": (["--checkpoint", dinov2_like, *SMALL, "--init_layerscale", "0.1"],
                                              "sets the --compare_init network: add --compare_init"),
                    "init_layerscale without layerscale": (["--checkpoint", good, *SMALL, "--compare_init",
                                                            "--init_layerscale", "0.1"], "blocks have no layerscale"),
                    "init_layerscale 0": (["--checkpoint", dinov2_like, *SMALL, "--compare_init",
                                           "--init_layerscale", "0"], "must be positive"),
                    "two checkpoints, one JSON": (["--checkpoint", good, dinov2_like, *SMALL, "--output_json", "x.json"],
                                                  "--output_json names one file or folder, but 2 checkpoints"),
                    "a checkpoint twice": (["--checkpoint", good, good, *SMALL], "a file is named twice"),
                    "the second checkpoint unknown": (["--checkpoint", good, str(tmp_path / "odd.pth"), *SMALL],
                                                      "width 64 and depth 2"),
                    "cache_gb negative": (["--checkpoint", good, *SMALL, "--cache_gb", "-1"], "must be >= 0"),
                    "avgpool with raw pixels": (["--raw_pixels", "--avgpool_patchtokens", *SMALL],
                                                "--avgpool_patchtokens chooses a network's feature: drop it with "
                                                "--raw_pixels"),
                    "avgpool with saved features": (["--load_features", str(tmp_path), "--avgpool_patchtokens",
                                                     *SMALL], "drop it with --load_features")}[case]
    with pytest.raises(SystemExit) as e:
        eval_knn.cli(argv)
    assert_clean_error(1, str(e.value.code), phrase)
    assert "\n" not in str(e.value.code)
