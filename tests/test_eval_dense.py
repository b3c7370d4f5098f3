"""eval_seg.py and eval_video_segmentation.py: the scores against hand computations and slow direct definitions,
label propagation against a loop over patches, a perfect feature scores 100, both data layouts end to end, a
simdino.py backbone above its initialisation, 2 processes = 1, bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dense_synthetic as ds
import eval_seg
import eval_video_segmentation as evs
import vit
from dist_step import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- J and F by hand

def test_region_similarity_by_hand_with_empty_and_late_objects():
    gt = np.zeros((4, 3, 4), dtype=bool)
    pred = np.zeros_like(gt)
    gt[0, 0, :2] = True                     # 2 px; predicted 3 px of which 2 right: 2 / 3
    pred[0, 0, :3] = True
    # frame 1: the object is absent and not predicted (it appears late): 1 by the benchmark's rule
    pred[2, 1, 1] = True                    # frame 2: absent but predicted: 0
    gt[3] = True                            # frame 3: 12 px, 6 predicted: 6 / 12
    pred[3, :, :2] = True
    np.testing.assert_allclose(evs.region_similarity(gt, pred), [2 / 3, 1.0, 0.0, 0.5])


def test_boundary_map_is_seg2bmap():
    m = np.zeros((4, 5), dtype=bool)
    m[1:3, 1:4] = True
    # a pixel is a boundary pixel when it differs from its right, lower or lower-right neighbour
    expected = np.array([[1, 1, 1, 1, 0],
                         [1, 0, 0, 1, 0],
                         [1, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(evs.boundary_map(m), expected)
    full = np.ones((3, 3), dtype=bool)      # last row compares right only, last column down only: none
    assert not evs.boundary_map(full).any()


def test_boundary_f_by_hand():
    gt = np.zeros((10, 10), dtype=bool)
    gt[2:6, 2:6] = True
    # 10 x 10: tolerance ceil(0.008 x 14.1) = 1 px. A prediction shifted by 1 px matches every boundary pixel
    shifted = np.roll(gt, 1, axis=1)
    assert evs.boundary_f(gt, shifted) == 1.0
    # shifted by 3 px: the boundaries are 4 x 4 squares' outlines; by hand, 6 of each one's 12 pixels lie within 1 px
    # of the other's (its two horizontal sides' overlapping parts ... checked against the slow definition below)
    far = np.roll(gt, 3, axis=1)
    assert evs.boundary_f(gt, far) == pytest.approx(slow_boundary_f(gt, far))
    assert 0 < evs.boundary_f(gt, far) < 1
    # empty cases: both empty 1, one empty 0
    empty = np.zeros_like(gt)
    assert evs.boundary_f(empty, empty) == 1.0
    assert evs.boundary_f(gt, empty) == 0.0 and evs.boundary_f(empty, gt) == 0.0
    # tolerance in pixels when >= 1: 3 px matches the 3-px shift exactly
    assert evs.boundary_f(gt, far, bound_th=3) == 1.0


def slow_boundary_f(gt, pred, bound_th=0.008):
    """The boundary F-measure from its definition: boundary pixels (seg2bmap) of each mask, a pixel matched when a
    boundary pixel of the other lies within the Euclidean radius r = ceil(bound_th x diagonal), pixel by pixel."""
    r = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    gb, pb = evs.boundary_map(gt), evs.boundary_map(pred)
    g_pts, p_pts = np.argwhere(gb), np.argwhere(pb)
    if len(g_pts) == 0 or len(p_pts) == 0:
        return 1.0 if len(g_pts) == len(p_pts) else 0.0

    def matched(a, b):
        return sum(any((y - v) ** 2 + (x - u) ** 2 <= r * r for v, u in b) for y, x in a)
    precision, recall = matched(p_pts, g_pts) / len(p_pts), matched(g_pts, p_pts) / len(g_pts)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_f_equals_its_slow_definition_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(12):
        h, w = rng.integers(8, 40, 2)
        gt = np.zeros((h, w), dtype=bool)
        pred = np.zeros((h, w), dtype=bool)
        for m in (gt, pred):                                        # blobs: a few random rectangles each
            for _ in range(rng.integers(0, 4)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                m[y:y + rng.integers(1, h), x:x + rng.integers(1, w)] = True
        bound = [0.008, 0.05, 2][trial % 3]
        assert evs.boundary_f(gt, pred, bound) == pytest.approx(slow_boundary_f(gt, pred, bound)), trial


def test_video_scores_by_hand_frames_objects_and_means():
    """Two objects; object 2 absent from the ground truth of frame 2 (appears late in frame 3) and predicted there;
    the first and the last frame are never scored."""
    gt = np.zeros((3, 8, 8), dtype=np.int64)
    gt[:, 0:4, 0:4] = 1
    gt[2, 4:8, 4:8] = 2
    pred = gt.copy()
    pred[1, 4:6, 4:6] = 2                   # a false object 2 in frame 2: J 0, F 0 for it there
    pred[2, 0:4, 0:2] = 0                   # half of object 1 lost in frame 3: J 1/2
    scores = evs.score_video(gt, pred, 2)
    assert scores[0]["J"] == pytest.approx([1.0, 1.0, 0.5]) and scores[0]["F"][:2] == [1.0, 1.0]
    assert scores[1]["J"] == pytest.approx([1.0, 0.0, 1.0]) and scores[1]["F"] == [1.0, 0.0, 1.0]
    f13 = slow_boundary_f(gt[2] == 1, pred[2] == 1)
    assert scores[0]["F"][2] == pytest.approx(f13)
    res = evs.summarize({"v": scores})
    j = (np.mean([1, 1, 0.5]) + np.mean([1, 0, 1])) / 2
    f = (np.mean([1, 1, f13]) + np.mean([1, 0, 1])) / 2
    assert res["J"]["mean"] == pytest.approx(100 * j) and res["F"]["mean"] == pytest.approx(100 * f)
    assert res["J&F"] == pytest.approx(50 * (j + f)) and res["num_objects"] == 2
    assert res["J"]["recall"] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)      # frames with J above 0.5 (not 0.5)
    # the means are over objects, not videos: a second video of one object weighs 1 / 3
    res2 = evs.summarize({"v": scores, "w": [{"J": [0.0], "F": [0.0]}]})
    assert res2["J"]["mean"] == pytest.approx(100 * (np.mean([1, 1, 0.5]) + np.mean([1, 0, 1])) / 3)


def test_statistics_decay_bins():
    # 8 frames: the benchmark's 4 bins of indices round(linspace(1, 8, 5)) - 1 = 0, 2, 4, 5, 7 (inclusive ends)
    v = [1.0, 1.0, 1.0, 0.6, 0.6, 0.2, 0.0, 0.0]
    s = evs.statistics(v)
    assert s["mean"] == pytest.approx(np.mean(v)) and s["recall"] == pytest.approx(5 / 8)      # 5 above 0.5
    assert s["decay"] == pytest.approx(np.mean(v[0:3]) - np.mean(v[5:8]))


# ----------------------------------------------------------------------------- label propagation

def slow_propagate(target, context, labels, topk, temperature, size, h, w):
    """The propagation formula, one target patch at a time: affinities exp(cos / T) to every context patch within
    `size` patches (rows and columns), the topk largest kept (ties with the k-th kept), normalised, labels averaged."""
    M, N, _ = context.shape
    out = torch.zeros(labels.shape[1], N, dtype=torch.float64)
    for j in range(N):
        cand = []
        for m in range(M):
            for i in range(N):
                near = abs(i // w - j // w) <= size and abs(i % w - j % w) <= size
                cos = F.cosine_similarity(context[m, i].double(), target[j].double(), dim=0)
                cand.append((math.exp(cos / temperature) if near or size == 0 else 0.0, m, i))
        kth = sorted((a for a, _, _ in cand), reverse=True)[topk - 1]
        kept = [(a, m, i) for a, m, i in cand if a >= kth]
        total = sum(a for a, _, _ in kept)
        for a, m, i in kept:
            out[:, j] += a / total * labels[m, :, i].double()
    return out


@pytest.mark.parametrize("size,topk", [(1, 3), (2, 5), (0, 4)])
def test_propagation_equals_a_loop_over_patches(size, topk):
    g = torch.Generator().manual_seed(size)
    h, w, D, M, C = 4, 5, 6, 3, 3
    target, context = torch.randn(h * w, D, generator=g), torch.randn(M, h * w, D, generator=g)
    labels = torch.softmax(torch.randn(M, C, h * w, generator=g), 1)
    mask = evs.neighbourhood(h, w, size) if size else None
    fast = evs.propagate(target, context, labels, topk, 0.1, mask)
    slow = slow_propagate(target, context, labels, topk, 0.1, size, h, w)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.sum(0), labels.sum(1).mean(0).new_ones(h * w), rtol=1e-5, atol=1e-5)


def test_neighbourhood_mask_and_norm_mask():
    m = evs.neighbourhood(3, 3, 1).reshape(3, 3, 3, 3)
    assert m[0, 0].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]] and m[1, 1].sum() == 9
    x = torch.tensor([[[0.2, 0.6], [0.4, 0.2]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    n = evs.norm_mask(x.clone())
    torch.testing.assert_close(n[0], torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert n[1].eq(0).all() and n[2].eq(1).all()                   # empty channel kept; constant one -> 1


# ----------------------------------------------------------------------------- mIoU / mAcc by hand

def test_segmentation_scores_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [0, 2, 2, eval_seg.IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [3, 2, 0, 3]])          # the ignored pixel's prediction does not count
    areas = eval_seg.confusion_areas(pred, labels, 5)
    # class 0: true {00, 01, 10}, predicted {00, 12}: inter 1, union 4; class 1: true 2, pred 3, inter 2, union 3;
    # class 2: true 2, pred 1, inter 1, union 2; class 3: never true, predicted once: IoU 0, Acc left out;
    # class 4: nowhere: left out of both means
    assert areas.tolist() == [[1, 2, 1, 0, 0], [4, 3, 2, 1, 0], [3, 2, 2, 0, 0]]
    s = eval_seg.seg_scores(areas)
    assert s["mIoU"] == pytest.approx(100 * (1 / 4 + 2 / 3 + 1 / 2 + 0) / 4)
    assert s["mAcc"] == pytest.approx(100 * (1 / 3 + 2 / 2 + 1 / 2) / 3)
    assert s["aAcc"] == pytest.approx(100 * 4 / 7)
    assert s["per_class_IoU"][4] is None and s["per_class_Acc"][3] is None and s["per_class_IoU"][3] == 0.0


def test_scores_are_summed_over_images_not_averaged():
    a = eval_seg.confusion_areas(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]), 2)
    b = eval_seg.confusion_areas(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]), 2)
    s = eval_seg.seg_scores(a + b)
    assert s["mIoU"] == pytest.approx(100 * (1 / 2 + 4 / 5) / 2)   # not the mean of the two images' mIoUs


def test_lr_schedule_and_rescale_size():
    args = eval_seg.get_args(["--iterations", "100", "--warmup_iters", "10", "--lr", "1.0"])
    assert eval_seg.lr_at(0, args) == pytest.approx(1e-6)
    assert eval_seg.lr_at(10, args) == pytest.approx(0.9)                 # poly 1 - 10 / 100, warm-up over
    assert eval_seg.lr_at(5, args) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert eval_seg.lr_at(99, args) == pytest.approx(0.01)
    assert eval_seg.rescale_size(480, 640, (2048, 512)) == (512, 683)        # short side to 512
    assert eval_seg.rescale_size(100, 1000, (2048, 512)) == (205, 2048)      # long side capped at 2048
    assert eval_seg.rescale_size(480, 640, (2048, 512), 0.5) == (256, 341)


def test_dense_features_layout():
    torch.manual_seed(0)
    m = vit.vit_tiny(patch_size=8, img_size=16, num_register_tokens=2).eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        f1 = eval_seg.dense_features(m, x)
        f4 = eval_seg.dense_features(m, x, 4, True)
        out = m.forward_features(x)
        last4 = m.get_intermediate_layers(x, 4)
    assert f1.shape == (2, 192, 2, 3) and f4.shape == (2, 8 * 192, 2, 3)
    torch.testing.assert_close(f1[:, :, 1, 2], out["patches"][:, 1 * 3 + 2])    # row-major patches, registers out
    torch.testing.assert_close(f4[:, -192:, 0, 0], out["cls"])                  # the last block's CLS, broadcast
    torch.testing.assert_close(f4[:, :192, 1, 0], last4[0][:, 3 + 3])           # 4th-from-last block's patch (1, 0)


# ----------------------------------------------------------------------------- a perfect feature scores 100

class Oracle(torch.nn.Module):
    """A stand-in backbone whose patch tokens are the one-hot of each patch's true class, read off the colour its
    centre pixel was painted with (dense_synthetic.COLOURS, exact in PNG files)."""
    patch_size, embed_dim, num_register_tokens = 8, len(ds.COLOURS), 0

    def one_hot(self, x):                                                       # (B, 3, H, W) normalised
        mean, std = torch.tensor(eval_seg.IMAGENET_MEAN), torch.tensor(eval_seg.IMAGENET_STD)
        p = self.patch_size
        centre = x[:, :, p // 2::p, p // 2::p].permute(0, 2, 3, 1) * std + mean    # (B, h, w, 3) in 0..1
        dist = (centre[..., None, :] * 255 - torch.tensor(ds.COLOURS).float()).abs().sum(-1)   # (B, h, w, K)
        return F.one_hot(dist.argmin(-1), self.embed_dim).flatten(1, 2).float()  # (B, h*w, K)

    def get_intermediate_layers(self, x, n=1):
        tokens = self.one_hot(x)
        return [torch.cat([tokens.new_zeros(len(x), 1, self.embed_dim), tokens], 1)] * n


def test_perfect_feature_gives_miou_100(tmp_path):
    data = ds.band_set(tmp_path / "bands", num_classes=4)
    args = eval_seg.get_args(["--data", data, "--crop_size", "32", "--img_scale", "32", "32", "--eval_mode", "whole",
                              "--iterations", "150", "--warmup_iters", "10", "--lr", "0.1", "--batch_size_per_gpu",
                              "4", "--cache_features", "--num_workers", "0"])
    train, val = eval_seg.SegFolder(data, "train"), eval_seg.SegFolder(data, "val")
    res = eval_seg.run(Oracle(), args, train, val, 4, 0, CPU, 0, 1)
    assert res["mIoU"] == 100.0 and res["mAcc"] == 100.0 and res["aAcc"] == 100.0


def test_perfect_feature_gives_j_and_f_100(tmp_path):
    data = ds.band_videos(tmp_path / "bands")
    args = evs.get_args(["--data", data, "--short_side", "48", "--size_multiple", "8"])
    oracle = Oracle()
    per_video = evs.evaluate(lambda x: oracle.one_hot(x[None])[0], evs.list_videos(args), args, 8, CPU,
                             str(tmp_path / "out"))
    res = evs.summarize(per_video)
    assert res["J&F"] == 100.0 and res["J"]["mean"] == 100.0 and res["F"]["mean"] == 100.0
    assert res["num_objects"] == 4
    # the written PNGs are the ground truth, indexed with the DAVIS palette
    png = evs.Image.open(tmp_path / "out" / "bands0" / "00003.png")
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]
    np.testing.assert_array_equal(np.array(png), np.array(evs.Image.open(tmp_path / "bands" / "bands0" / "masks" /
                                                                         "00003.png")))


# ----------------------------------------------------------------------------- the scripts, both layouts

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A ViT-T/8 in this project's checkpoint layout (teacher and student, args with the seed)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.manual_seed(3)
    m = vit.vit_tiny(patch_size=8, img_size=16)
    sd = {f"backbone.{k}": v for k, v in m.state_dict().items()}
    torch.save({"teacher": sd, "student": sd, "iteration": 7, "args": {"seed": 0, "arch": "vit_tiny"}}, path)
    return str(path)


SEG = ["--crop_size", "32", "--img_scale", "96", "48", "--stride", "16", "--iterations", "20", "--warmup_iters", "5",
       "--batch_size_per_gpu", "4", "--num_workers", "0"]
VID = ["--short_side", "48", "--size_multiple", "8"]


def test_seg_script_on_both_layouts(tiny_checkpoint, tmp_path, capsys):
    ade = ds.segmentation_set(tmp_path / "ADEChallengeData2016", "ade20k", n_train=8, n_val=4)
    folder = ds.segmentation_set(tmp_path / "folder", "folder", n_train=8, n_val=4)
    eval_seg.main(eval_seg.get_args(["--checkpoint", tiny_checkpoint, "--data", ade, *SEG, "--compare_init",
                                     "--output_dir", str(tmp_path)]))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("linear segmentation (")]
    assert len(lines) == 2 and "vit_tiny/8 teacher" in lines[0] and "random init, seed 0" in lines[1]
    res = json.loads((tmp_path / "checkpoint_seg.json").read_text())      # the default name, in --output_dir
    assert res["layout"] == "ade20k" and res["num_classes"] == 150 and len(res["per_class_IoU"]) == 150
    assert res["num_train"] == 8 and res["num_val"] == 4 and res["iteration"] == 7 and res["batch_size"] == 4
    present = {c for c in range(150) if res["per_class_Acc"][c] is not None}
    assert present and max(present) <= 7                                  # 0 "other" ignored, shapes 1..7 -> 0..6, bg 0
    for r in (res, res["init"]):
        assert 0 <= r["mIoU"] <= 100 and 0 <= r["mAcc"] <= 100
    out = tmp_path / "folder.json"
    eval_seg.main(eval_seg.get_args(["--checkpoint", tiny_checkpoint, "--data", folder, *SEG, "--cache_features",
                                     "--output_json", str(out)]))
    res = json.loads(out.read_text())
    assert res["layout"] == "folder" and res["num_classes"] == 8 and res["cache_features"] is True  # bg + 7 shapes


def test_ade_labels_and_the_ignore_index(tmp_path):
    ade = ds.segmentation_set(tmp_path / "ade", "ade20k", n_train=1, n_val=1)
    folder = ds.segmentation_set(tmp_path / "folder", "folder", n_train=1, n_val=1)
    raw = np.array(eval_seg.Image.open(os.path.join(folder, "train", "masks", "000.png")), dtype=np.int64)
    a, f = eval_seg.SegFolder(ade, "train")[0][1], eval_seg.SegFolder(folder, "train", ignore_index=0)[0][1]
    np.testing.assert_array_equal(a, raw)                                 # ADE's 1.. are 0..; its 0 is ignored
    np.testing.assert_array_equal(f, np.where(raw == 0, eval_seg.IGNORE, raw))


def test_video_script_on_both_layouts_gives_the_same_scores(tiny_checkpoint, tmp_path, capsys):
    davis = ds.videos(tmp_path / "DAVIS", "davis", n_videos=2, n_frames=6)
    folder = ds.videos(tmp_path / "videos", "folder", n_videos=2, n_frames=6)
    evs.main(evs.get_args(["--checkpoint", tiny_checkpoint, "--data", davis, *VID, "--compare_init"]))
    out = capsys.readouterr().out
    assert "DAVIS (vit_tiny/8 teacher" in out and "DAVIS (vit_tiny/8 random init, seed 0" in out
    res = json.loads(open(tiny_checkpoint.replace(".pth", "_davis.json")).read())   # beside the checkpoint
    assert res["num_videos"] == 2 and res["num_objects"] == 4 and set(res["per_object"]) == {
        "video0_1", "video0_2", "video1_1", "video1_2"}
    assert res["J&F"] == pytest.approx((res["J"]["mean"] + res["F"]["mean"]) / 2)
    pngs = sorted(os.listdir(os.path.join(res["predictions"], "video1")))
    assert pngs == [f"{t:05d}.png" for t in range(6)] and os.path.isdir(os.path.join(res["predictions"], "init"))
    evs.main(evs.get_args(["--checkpoint", tiny_checkpoint, "--data", folder, *VID, "--output_dir",
                           str(tmp_path / "f")]))
    again = json.loads((tmp_path / "f" / "checkpoint_davis.json").read_text())
    assert again["per_object"] == res["per_object"] and again["J&F"] == res["J&F"]


# ----------------------------------------------------------------------------- the learning check

@pytest.fixture(scope="module")
def quickstart_checkpoint(tmp_path_factory):
    """The README's quick start SimDINO run (124 iterations on the synthetic data, about 2 minutes on 2 cores),
    as the README writes it but for its output folder and loader workers."""
    from test_readme import script_calls
    argv = next(a for script, a, _ in script_calls("README.md") if script == "simdino.py")
    out = tmp_path_factory.mktemp("quickstart")
    argv = argv[:argv.index("--num_workers")] + ["--num_workers", "0", "--output_dir", str(out)]
    assert "synthetic:2000" in argv and "--output_dir" not in argv[:-2]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "simdino.py"), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})  # alone: both cores
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out / "checkpoint.pth")


def test_trained_backbone_beats_its_init_on_figure_ground_segmentation(quickstart_checkpoint, tmp_path):
    """Shape against background on data.py's own images (colours random, so a patch's colour does not say which it
    is): the trained teacher's patch tokens know the object, the random network's mostly do not. Measured margins:
    +11.8 / +10.3 mIoU for training seeds 0 / 1 (docs/dense_evaluation.md); 3 is asserted."""
    data = ds.figure_ground_set(tmp_path / "fg", n_train=200, n_val=100, size=64)
    out = tmp_path / "seg.json"
    eval_seg.main(eval_seg.get_args(["--checkpoint", quickstart_checkpoint, "--data", data, "--crop_size", "64",
                                     "--img_scale", "64", "64", "--eval_mode", "whole", "--iterations", "1000",
                                     "--warmup_iters", "50", "--lr", "0.01", "--batch_size_per_gpu", "16",
                                     "--cache_features", "--compare_init", "--num_workers", "0",
                                     "--output_json", str(out)]))
    res = json.loads(out.read_text())
    assert res["iteration"] == 124 and res["num_classes"] == 2
    assert res["mIoU"] > res["init"]["mIoU"] + 3, (res["mIoU"], res["init"]["mIoU"])


def test_trained_backbone_beats_its_init_on_flickering_videos(quickstart_checkpoint, tmp_path):
    """Moving shapes whose frames change exposure, contrast and white balance: the colour jitter SimDINO trains
    against. Measured margins: +4.6 / +3.0 J&F for training seeds 0 / 1 (docs/dense_evaluation.md); 1 is asserted."""
    data = ds.videos(tmp_path / "flicker", "folder", n_videos=8, n_frames=10, size=(96, 128), flicker=0.4)
    evs.main(evs.get_args(["--checkpoint", quickstart_checkpoint, "--data", data, "--short_side", "96",
                           "--size_multiple", "8", "--compare_init", "--output_dir", str(tmp_path / "vid")]))
    res = json.loads((tmp_path / "vid" / "checkpoint_davis.json").read_text())
    assert res["num_objects"] == 16
    assert res["J&F"] > res["init"]["J&F"] + 1, (res["J&F"], res["init"]["J&F"])


# ----------------------------------------------------------------------------- 2 processes = 1

def dist_worker(rank, world_size, port, script, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    script.main(script.get_args(argv))


def test_two_processes_give_the_numbers_of_one(tiny_checkpoint, tmp_path):
    """The augmented views are seeded per image and epoch, the global batch is cut the same way, BN statistics and
    the loss's normaliser are global, the val images and videos shared out: the same scores."""
    seg = ds.segmentation_set(tmp_path / "seg", "folder", n_train=8, n_val=5)
    vids = ds.videos(tmp_path / "vids", "folder", n_videos=3, n_frames=5)
    runs = {}
    for n in (1, 2):
        seg_argv = ["--checkpoint", tiny_checkpoint, "--data", seg, *SEG, "--batch_size_per_gpu", str(4 // n),
                    "--output_json", str(tmp_path / f"seg{n}.json")]
        vid_argv = ["--checkpoint", tiny_checkpoint, "--data", vids, *VID, "--output_dir", str(tmp_path / f"v{n}")]
        for script, argv in ((eval_seg, seg_argv), (evs, vid_argv)):
            mp.start_processes(dist_worker, args=(n, free_port(), script, argv), nprocs=n, start_method="fork")
        runs[n] = (json.loads((tmp_path / f"seg{n}.json").read_text()),
                   json.loads((tmp_path / f"v{n}" / "checkpoint_davis.json").read_text()))
    (seg1, vid1), (seg2, vid2) = runs[1], runs[2]
    assert seg2["batch_size"] == seg1["batch_size"] == 4
    for k in ("mIoU", "mAcc", "aAcc"):
        assert seg2[k] == pytest.approx(seg1[k], abs=1e-3), k
    assert vid2["per_object"] == vid1["per_object"] and vid2["J&F"] == vid1["J&F"]


# ----------------------------------------------------------------------------- bad input

def assert_clean_error(returncode, stderr, phrase):
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, stderr


def bad_data(tmp_path):
    """A generic seg folder with an image whose mask is missing, one whose masks hold label 7, a video folder whose
    first frame has no mask, and an empty folder."""
    seg = ds.segmentation_set(tmp_path / "seg", "folder", n_train=2, n_val=1)
    nomask = ds.segmentation_set(tmp_path / "nomask", "folder", n_train=2, n_val=1)
    os.remove(os.path.join(nomask, "train", "masks", "001.png"))
    vids = ds.videos(tmp_path / "vids", "folder", n_videos=1, n_frames=3)
    os.remove(os.path.join(vids, "video0", "masks", "00000.png"))
    (tmp_path / "empty").mkdir()
    return seg, nomask, vids, str(tmp_path / "empty")


SEG_CASES = ["no data", "missing mask", "too few classes", "crop not divisible", "too many blocks", "bad ratio",
             "unwritable json"]
VID_CASES = ["no data", "first mask missing", "no videos", "video list missing", "topk 0", "unwritable predictions"]


@pytest.mark.parametrize("script,case", [("seg", c) for c in SEG_CASES] + [("video", c) for c in VID_CASES])
def test_bad_input_in_process(script, case, tiny_checkpoint, tmp_path):
    seg, nomask, vids, empty = bad_data(tmp_path)
    ck = ["--checkpoint", tiny_checkpoint]
    cases = {("seg", "no data"): (ck + SEG, "pass --data DIR"),
             ("seg", "missing mask"): (ck + SEG + ["--data", nomask], "1 of them without a mask"),
             ("seg", "too few classes"): (ck + SEG + ["--data", seg, "--num_classes", "3"],
                                          "--num_classes 3 is too small"),
             ("seg", "crop not divisible"): (ck + ["--data", seg, "--crop_size", "12"],
                                             "not divisible by the patch size 8"),
             ("seg", "too many blocks"): (ck + SEG + ["--data", seg, "--n_last_blocks", "13"], "between 1 and"),
             ("seg", "bad ratio"): (ck + SEG + ["--data", seg, "--ratio_range", "2", "1"], "need 0 < low <= high"),
             ("video", "no data"): (ck + VID, "pass --data DIR"),
             ("video", "first mask missing"): (ck + VID + ["--data", vids], "no mask of its first frame 00000.jpg"),
             ("video", "no videos"): (ck + VID + ["--data", empty], "holds no videos"),
             ("video", "video list missing"): (ck + VID + ["--data", vids, "--video_list", "nope.txt"],
                                               "does not exist"),
             ("video", "topk 0"): (ck + VID + ["--data", vids, "--topk", "0"], "--topk 0 must be positive"),
             # an unwritable result is refused before the (here missing) checkpoint is read
             ("seg", "unwritable json"): (ck + SEG + ["--data", seg, "--output_json", "/proc/x/r.json"],
                                          "cannot write the result to /proc/x/r.json"),
             ("video", "unwritable predictions"): (ck + VID + ["--data", vids, "--output_dir", "/proc/x"],
                                                   "cannot write the result to /proc/x/")}
    argv, phrase = cases[(script, case)]
    with pytest.raises(SystemExit) as e:
        (eval_seg if script == "seg" else evs).cli(argv)
    assert_clean_error(1, str(e.value.code), phrase)


def test_bad_input_from_the_command_line(tmp_path):
    """As a user runs it (one run: both scripts end in the same cli())."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval_video_segmentation.py"), "--checkpoint",
                        str(tmp_path / "nope.pth"), "--data", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert_clean_error(p.returncode, p.stderr, "does not exist")


def test_training_views_are_seeded_per_image_and_epoch_and_crops_avoid_one_class(tmp_path):
    data = ds.segmentation_set(tmp_path / "seg", "folder", n_train=3, n_val=1)
    args = eval_seg.get_args(["--data", data, *SEG])
    views = eval_seg.TrainViews(eval_seg.SegFolder(data, "train"), args, seed=0)
    (x0, y0), (x0b, y0b), (x1, _) = views[4], views[4], views[1 * 3 + 1 + 3]       # key = epoch * 3 + image
    assert x0.shape == (3, 32, 32) and y0.shape == (32, 32)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b) and not torch.equal(x0, x1)
    # a crop is redrawn while one class covers >= 75 % of it: left half class 0, right half class 1
    labels = torch.zeros(64, 64, dtype=torch.long)
    labels[:, 32:] = 1
    for seed in range(5):
        top, left = eval_seg.random_crop_box(labels, 32, np.random.default_rng(seed))
        counts = torch.bincount(labels[top:top + 32, left:left + 32].flatten(), minlength=2)
        assert counts.min() > 0 and counts.max() / counts.sum() < 0.75
    assert torch.equal(torch.as_tensor(eval_seg.batch_keys(4, 2, 1, 0, 3, 0)).flatten(),
                       torch.cat([torch.as_tensor(eval_seg.batch_keys(4, 1, 2, r, 3, 0)) for r in (0, 1)], 1).flatten())
