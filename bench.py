"""Throughput of a method's real training step, the input pipeline that feeds it, and memory.

The step: the method's own `train()` runs unchanged, except that its dataset is replaced by one that
returns the same random uint8 crops every time, so the number measures the step (the on-device part of
the augmentation, student and teacher forwards, loss, backward, optimiser, EMA, logging) and not JPEG
decoding. The speed is taken between two log records after `--warmup` steps (compilation excluded):

    python bench.py simdino --arch vit_base --batch_size_per_gpu 64                 # one GPU (or CPU)
    python bench.py simdinov2 --arch vit_large --batch_size_per_gpu 32 --compile --peak_tflops 989
    torchrun --nproc_per_node=8 bench.py dino --arch vit_base --fsdp

Everything after the method names goes to the methods' own arguments. Prints one line per run: images/s,
ms per step, peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS) and the
backbone's training FLOP rate (3x the forward FLOPs of the student on all crops plus the teacher's forward
on the global crops, heads not counted; what is computed: under DINOv2's stochastic depth the blocks of
the v2 students compute only the kept samples) and, with --peak_tflops (e.g. 989 for dense bf16 on an H100 SXM),
the model FLOP utilisation.

Several runs side by side, each in a fresh process (its own peak memory), one after the other:

    python bench.py simdino dino --arch vit_tiny --repeats 3                        # SimDINO's step vs DINO's, A B A B A B
    python bench.py simdino --arch vit_base --compare_grad_checkpointing            # memory without / with
    python bench.py simdino dino simdinov2 dinov2 --compare bf16 --repeats 2          # float32 vs bf16, A B A B
    python bench.py simdinov2 dinov2 --compare drop_path_mode --repeats 2             # DINO's vs DINOv2's drop path

What one training step communicates (--comm), under torchrun on any backend (gloo on a CPU): the method's
train() runs as above, and the collectives of one step after the first two (DDP rebuilds its buckets in the
second) are counted with torch.distributed.tensor.debug.CommDebugMode, by kind, with the bytes of the full
buffer each one gathers, scatters or reduces. These depend on the parameters only, not on the crop sizes or
the batch, so small crops count what 224 px crops would. --bf16 gathers bf16 parameters as on CUDA:

    torchrun --nproc_per_node 2 bench.py dino --comm --arch vit_small --fsdp --global_crops_size 32 \
        --local_crops_size 16 --batch_size_per_gpu 2 --num_workers 0

The input pipeline (--loader): images/s of data.py's multi-crop pipeline in one process on one thread,
i.e. per loader worker, on the first images of --data, with and without JPEG decoding, for DINO's PIL
pipeline as it was (float32 out), the same with uint8 out, and the default split (crop and flip in the
worker, photometric augmentation batched in the training process); and how many loader cores the step
rate just measured needs. ImageNet-sized JPEGs to run it on can be generated:

    python bench.py --make_jpegs out/jpegs 300
    python bench.py simdino --arch vit_base --data out/jpegs --loader
"""
import argparse
import collections
import importlib
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import data
import vit

METHODS = ["simdino", "simdinov2", "dino", "dinov2"]
COMPARISONS = {  # --compare WHAT: the variants measured side by side, the first the baseline
    "bf16": [["--no-bf16"], ["--bf16"]],
    "grad_checkpointing": [[], ["--grad_checkpointing"]],
    "drop_path_mode": [["--drop_path_mode", "dino"], ["--drop_path_mode", "dinov2"]],   # the v2 methods'
}


def natural_image(rng, width=500, height=375):
    """A PIL RGB image that decodes and augments like a photograph: colour noise with a 1/f-like
    spectrum (one random colour mix per octave), a few flat ellipses for sharp edges, and sensor
    noise. rng: a numpy Generator."""
    img = np.zeros((height, width, 3), np.float32)
    for k in range(1, 9):                                       # octaves: from about 2 x 2 cells up to pixels
        gh, gw = max(2, height >> (8 - k)), max(2, width >> (8 - k))
        cells = rng.standard_normal((gh, gw, 3)).astype(np.float32) @ rng.standard_normal((3, 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(cells[..., c]).resize((width, height), Image.BICUBIC))
                       for c in range(3)], -1)                  # (H, W, 3)
        img += up / 1.4 ** k                                    # coarser octaves carry more energy
    img = (img - img.mean()) / (img.std() + 1e-6) * 50 + rng.uniform(80, 170, 3)
    img += rng.standard_normal((height, width, 1)).astype(np.float32) * 6
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(2, 6)):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 90)
        draw.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r],
                     fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    return pil


def make_jpegs(folder, n, classes=10, quality=90):
    """n natural-looking 500 x 375 JPEGs (ImageNet's typical size) in folder/train/<class>/, about 70 KB each."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(folder, "train", f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        natural_image(rng).save(os.path.join(d, f"{i:06d}.jpg"), quality=quality)
    print(f"wrote {n} JPEGs of 500 x 375 to {os.path.join(folder, 'train')}")


class RepeatedCrops(torch.utils.data.Dataset):
    """`length` samples that are all the same random multi-crop views (2 global + local crops)."""

    def __init__(self, length, args):
        g = torch.Generator().manual_seed(0)
        self.views = ([torch.randint(256, (3, args.global_crops_size, args.global_crops_size), generator=g, dtype=torch.uint8) for _ in range(2)]
                      + [torch.randint(256, (3, args.local_crops_size, args.local_crops_size), generator=g, dtype=torch.uint8)
                         for _ in range(args.local_crops_number)])
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.views, 0


def backbone_train_flops(args):
    """FLOPs of one training step of the backbones per image, as computed: 3 x the student's training forward on
    every crop (forward + backward) + the teacher's forward on the global crops. The student is counted in training
    mode on the step's own batch (meta tensors: nothing runs), so DINOv2's stochastic depth (--drop_path_mode
    dinov2), whose branches see only the kept samples, counts only those."""
    kw = dict(patch_size=args.patch_size, img_size=args.global_crops_size, num_register_tokens=args.num_register_tokens)
    with torch.device("meta"):
        student = vit.build_vit(args.arch, drop_path_rate=args.drop_path_rate, **kw,
                                drop_path_uniform=getattr(args, "drop_path_uniform", False),
                                drop_path_mode=getattr(args, "drop_path_mode", "dino")).train()
        teacher = vit.build_vit(args.arch, **kw).eval()
    B, G, L = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size
    crops = [torch.empty(2 * B, 3, G, G, device="meta")]                  # the step's tensors, as Network passes them
    crops += [torch.empty(args.local_crops_number * B, 3, L, L, device="meta")] if args.local_crops_number else []
    with FlopCounterMode(display=False) as counter:
        student.forward_features_list(crops)
    with FlopCounterMode(display=False) as teacher_counter:
        teacher.forward_features(crops[0])
    return (3 * counter.get_total_flops() + teacher_counter.get_total_flops()) / B


def peak_memory():
    """(bytes, what was measured): the CUDA allocator's peak on a GPU; on CPU the process's peak resident set
    (model, optimiser, activations, plus about half a GiB of libraries), which only a fresh process can measure."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"   # Linux reports KiB


def measure_step(bench, method_name, rest):
    """Run the method's own train() on RepeatedCrops in this process; a dict of what was measured."""
    method = importlib.import_module(method_name)
    out = tempfile.mkdtemp(prefix="bench_")
    args = method.get_args(rest + ["--epochs", "1", "--warmup_epochs", "0", "--log_every", str(bench.warmup),
                                   "--saveckp_freq", "0", "--saveckp_every", "0", "--output_dir", out])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    n = (bench.warmup + bench.steps) * args.batch_size_per_gpu * world_size
    method.build_dataset = lambda *a, **k: RepeatedCrops(n, args)     # the method's loop, without data loading
    method.train(args)
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    shutil.rmtree(out)                                             # the checkpoint it wrote is of no use
    first, last = log[0], log[-1]                                  # after the warm-up steps, and at the end
    steps = last["iteration"] - first["iteration"]
    seconds = last["time"] - first["time"]
    images_per_s = steps * args.batch_size_per_gpu * world_size / seconds
    memory, memory_kind = peak_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"method": method_name, "arch": args.arch, "patch_size": args.patch_size, "world_size": world_size,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "precision": "bf16" if args.bf16 and vit.bf16_native(device) else "float32",
            "batch": args.batch_size_per_gpu, "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
            "images_per_s": images_per_s, "ms_per_step": 1000 * seconds / steps, "memory": memory,
            "memory_kind": memory_kind, "tflops": backbone_train_flops(args) * images_per_s / 1e12}


class CommCounter(CommDebugMode):
    """CommDebugMode that also adds up, per kind of collective, the bytes of the full buffer each one moves:
    the gathered output of an all-gather, the input of a reduce-scatter, the tensors of an all-reduce."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = sum(self.comm_counts.values())
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if sum(self.comm_counts.values()) > before:                 # a collective (CommDebugMode counted it)
            name = func._overloadpacket.__name__.replace("_", "")
            kind = next((k for k in ("allgather", "reducescatter", "allreduce", "broadcast") if k in name), name)
            self.calls[kind] += 1
            self.bytes[kind] += max(tensor_bytes(a) for a in args)
        return out


def tensor_bytes(x):
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(tensor_bytes(t) for t in x) if isinstance(x, (list, tuple)) else 0


class StepWatch(dict):
    """The method's RUN record, which train() updates with the iteration it starts: count that iteration's
    collectives."""

    def __init__(self, run, iteration):
        super().__init__(run)
        self.measured, self.counter = iteration, CommCounter()

    def __setitem__(self, key, value):
        if key == "iteration" and value == self.measured + 1:
            self.counter.__exit__(None, None, None)
        super().__setitem__(key, value)
        if key == "iteration" and value == self.measured:
            self.counter.__enter__()


def measure_comm(method_name, rest):
    """The collectives of iteration 2 of the method's own train() (not a log or checkpoint iteration)."""
    method = importlib.import_module(method_name)
    out = tempfile.mkdtemp(prefix="bench_")
    args = method.get_args(rest + ["--epochs", "1", "--epoch_length", "4", "--warmup_epochs", "0", "--log_every",
                                   "1000", "--saveckp_freq", "0", "--saveckp_every", "0", "--output_dir", out])
    world_size = int(os.environ["WORLD_SIZE"])
    method.build_dataset = lambda *a, **k: RepeatedCrops(4 * args.batch_size_per_gpu * world_size, args)
    distribute = method.distribute
    method.distribute = lambda student, teacher, a, n, bf16=False: distribute(student, teacher, a, n, a.bf16)
    watch = method.RUN = StepWatch(method.RUN, iteration=2)        # bf16 above: as on CUDA, CPU included
    method.train(args)
    shutil.rmtree(out, ignore_errors=True)
    return args, watch.counter


def print_comm(method_name, args, counter):
    world_size = int(os.environ["WORLD_SIZE"])
    setup = (f"{'FSDP2' if args.fsdp else 'DDP'}{', bf16 parameters' if args.fsdp and args.bf16 else ''}"
             f"{', grad checkpointing' if args.grad_checkpointing else ''}")
    print(f"{method_name} {args.arch}/{args.patch_size}, {world_size} processes, {setup}: one step (rank 0)")
    for kind in sorted(counter.calls):
        print(f"  {kind}: {counter.calls[kind]} calls, {counter.bytes[kind] / 2**20:.2f} MiB")
    print("collectives per step (rank 0): " + " ".join(f"{k}={v}" for k, v in comm_summary(counter).items()))


def comm_summary(counter):
    c = counter.calls
    return {"all_gather": c["allgather"], "reduce_scatter": c["reducescatter"], "all_reduce": c["allreduce"],
            "broadcast": c["broadcast"], "bytes": sum(counter.bytes.values())}


def step_line(r, peak_tflops=None):
    mfu = f", MFU {100 * r['tflops'] / (peak_tflops * r['world_size']):.1f}%" if peak_tflops else ""
    variant = f" [{r['variant']}]" if r.get("variant") else ""
    return (f"{r['method']}{variant} {r['arch']}/{r['patch_size']} on {r['world_size']} x {r['device']}, "
            f"batch {r['batch']}"
            f"/process, {r['precision']}, {'compiled' if r['compile'] else 'eager'}{', grad checkpointing' if r['grad_checkpointing'] else ''}: "
            f"{r['images_per_s']:.1f} images/s, {r['ms_per_step']:.1f} ms/step, peak memory {r['memory'] / 2**30:.2f} GiB "
            f"({r['memory_kind']}), backbone {r['tflops']:.2f} TFLOP/s{mfu}")


def run_child(bench, method_name, rest):
    """measure_step in a fresh process, so that its speed and peak memory are its own."""
    cmd = [sys.executable, os.path.abspath(__file__), method_name, "--steps", str(bench.steps),
           "--warmup", str(bench.warmup), "--json", *rest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if proc.returncode or not lines:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_JSON "):])


def measure_loader(args, n_images, rounds, batch=32):
    """Images/s of the multi-crop pipeline in one process on one thread, i.e. per loader worker (= core), on
    the first n_images of --data: with decoding (as the workers run) and on images decoded beforehand. The
    candidates run in turns, `rounds` times, so a busy machine slows them alike; each makes whole batches
    with collate_multicrop, as a worker does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = data.build_dataset(args.data, None, "train", "skip")       # PIL images, decoded on access
    idx = list(range(min(n_images, len(ds))))
    decoded = [ds[i][0] for i in idx]
    crops = (args.global_crops_scale, args.local_crops_scale, args.local_crops_number, args.global_crops_size,
             args.local_crops_size)
    pil, dev = (data.MultiCropAugmentation(*crops, photometric=p) for p in ("pil", "device"))
    tail = [transforms.ToTensor(), transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]
    old = [transforms.Compose(t.transforms[:-1] + tail)           # as data.py was: ToTensor and Normalize in the worker
           for t in (pil.global_transform1, pil.global_transform2, pil.local_transform)]
    candidates = {  # name: the transform a worker runs
        "DINO's PIL pipeline, float32 out (before)":
            lambda img: [old[0](img), old[1](img)] + [old[2](img) for _ in range(args.local_crops_number)],
        "DINO's PIL pipeline, uint8 out (--photometric pil)": pil,
        "crop + flip in the worker, uint8 out (--photometric device, the default on CUDA)": dev}
    seconds = {(name, decode): math.inf for name in candidates for decode in (True, False)}
    for _ in range(rounds):                                        # the best round of each: the least disturbed
        for (name, decode) in seconds:
            aug = candidates[name]
            t0 = time.perf_counter()
            for k in range(0, len(idx), batch):
                data.collate_multicrop([(aug(ds[i][0] if decode else decoded[i]), 0) for i in idx[k:k + batch]])
            seconds[name, decode] = min(seconds[name, decode], time.perf_counter() - t0)
    result = {name: (len(idx) / seconds[name, True], len(idx) / seconds[name, False]) for name in candidates}
    decode_ms = {}
    if isinstance(ds, data.ImageFolderDataset):                    # JPEG decoding alone, full size and PIL's draft
        for draft in (False, True):
            t0 = time.perf_counter()
            for i in idx:
                with Image.open(ds.samples[i][0]) as im:
                    if draft:
                        im.draft("RGB", (im.width // 2, im.height // 2))
                    im.convert("RGB")
            decode_ms[draft] = 1000 * (time.perf_counter() - t0) / len(idx)
    torch.set_num_threads(threads)
    # the device path's other half: photometric augmentation in the training process, one batch at a time
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = data.collate_multicrop([(dev(decoded[i % len(decoded)]), 0) for i in range(args.batch_size_per_gpu)])
    xg, xl = b["xg"].to(device), b["xl"].to(device)
    dev.on_device(xg, xl)                                          # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        dev.on_device(xg, xl)
    sync()
    on_device = 5 * args.batch_size_per_gpu / (time.perf_counter() - t0)
    sizes = [im.size for im in decoded]
    return result, decode_ms, on_device, sizes


def print_loader(args, result, decode_ms, on_device, sizes, steps):
    w, h = (sum(s[k] for s in sizes) / len(sizes) for k in (0, 1))
    crops = f"2 x {args.global_crops_size} + {args.local_crops_number} x {args.local_crops_size}"
    print(f"loader on {args.data} ({len(sizes)} images, mean {w:.0f} x {h:.0f}), {crops} crops, one core per worker:")
    before = next(iter(result.values()))
    for name, (with_decode, without) in result.items():
        need = "; ".join(f"cores needed for {r['method']}'s {r['images_per_s']:.1f} images/s: "
                         f"{r['images_per_s'] / with_decode:.2f}" for r in steps)
        print(f"  {name}: {with_decode:.1f} images/s with decoding ({with_decode / before[0]:.2f}x), "
              f"{without:.1f} without ({without / before[1]:.2f}x); {need}")
    if decode_ms:
        print(f"  JPEG decoding alone: {decode_ms[False]:.2f} ms/image full size, {decode_ms[True]:.2f} ms with PIL's "
              f"draft at 1/2 (not used: the smallest crops would then be upsampled from half the pixels)")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU, all threads"
    print(f"  photometric augmentation + normalisation in the training process ({where}): {on_device:.1f} images/s "
          f"at batch {args.batch_size_per_gpu}")


def main():
    p = argparse.ArgumentParser("bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="*", metavar="METHOD",
                   help=f"One or more of {', '.join(METHODS)}: several are measured one after the other, each in "
                        f"its own process, with the same flags.")
    p.add_argument("--steps", default=30, type=int, help="Measured steps, after the warm-up.")
    p.add_argument("--warmup", default=10, type=int, help="Steps before the measurement (compilation, allocator); >= 1.")
    p.add_argument("--peak_tflops", default=None, type=float, help="The device's peak TFLOP/s, for the MFU.")
    p.add_argument("--compare", nargs="+", default=[], choices=list(COMPARISONS), metavar="WHAT",
                   help="Measure each method in the variants of WHAT, each in its own process, side by side, and "
                        "print their images/s relative to the first: bf16: --no-bf16 vs --bf16 (float32 vs bf16 "
                        "autocast); grad_checkpointing: without vs with; drop_path_mode (simdinov2, dinov2): dino vs "
                        "dinov2. Several WHATs: every combination. With --repeats, in turns (A B A B).")
    p.add_argument("--compare_grad_checkpointing", action="store_true",
                   help="Measure each method without and with --grad_checkpointing (each in its own process): "
                        "speed and peak memory side by side (--compare grad_checkpointing).")
    p.add_argument("--repeats", default=1, type=int,
                   help="With several runs: run them all this many times, in turns, and report the fastest of each.")
    p.add_argument("--loader", action="store_true",
                   help="Also measure the input pipeline on the method's --data (a folder of JPEGs: see "
                        "--make_jpegs): images/s per loader core, before and now, and the cores the step needs.")
    p.add_argument("--loader_images", default=32, type=int, help="Images the loader measurement reads per round.")
    p.add_argument("--loader_rounds", default=5, type=int,
                   help="Turns each loader candidate takes; its fastest turn is reported (the least disturbed).")
    p.add_argument("--make_jpegs", nargs=2, metavar=("DIR", "N"),
                   help="Write N natural-looking 500 x 375 JPEGs to DIR/train/<class>/ for --loader, then exit.")
    p.add_argument("--comm", action="store_true",
                   help="Under torchrun: count the collectives of one training step and the bytes they move "
                        "(CommDebugMode), instead of timing steps.")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # a child run: print a JSON record
    bench, rest = p.parse_known_args()
    if bench.make_jpegs:
        return make_jpegs(bench.make_jpegs[0], int(bench.make_jpegs[1]))
    if not bench.methods or any(m not in METHODS for m in bench.methods):
        p.error(f"name one or more METHODs first, of {', '.join(METHODS)} (or pass --make_jpegs DIR N)")
    if bench.warmup < 1:
        p.error("--warmup must be >= 1: the first log record marks the start of the measurement")
    compare = [*bench.compare, *["grad_checkpointing"] * bench.compare_grad_checkpointing]
    variants = [sum(v, []) for v in itertools.product(*(COMPARISONS[w] for w in dict.fromkeys(compare)))]
    for m in bench.methods:                           # a flag one method lacks fails now, not after the others ran
        for v in variants:
            importlib.import_module(m).get_args(rest + v)
    if bench.comm:
        if "WORLD_SIZE" not in os.environ or len(bench.methods) != 1:
            p.error("--comm counts one method's step under torchrun: torchrun --nproc_per_node N bench.py METHOD --comm")
        args, counter = measure_comm(bench.methods[0], rest)
        if int(os.environ["RANK"]) == 0:
            print_comm(bench.methods[0], args, counter)
        return
    runs = [(m, rest + v) for m in bench.methods for v in variants]
    if bench.json:
        print("BENCH_JSON " + json.dumps(measure_step(bench, *runs[0])))
        return
    if len(runs) == 1 and bench.repeats == 1:
        steps = [measure_step(bench, *runs[0])]
        if steps[0] is None:                                       # not rank 0
            return
    elif "WORLD_SIZE" in os.environ:
        sys.exit("error: under torchrun, bench.py measures one method, without --compare")
    else:  # repeats take turns (A B A B), and the fastest of each run counts: a busy machine disturbs single runs
        results = [run_child(bench, *run) for _ in range(bench.repeats) for run in runs]
        steps = [max(results[k::len(runs)], key=lambda r: r["images_per_s"]) for k in range(len(runs))]
    for r, (_, argv) in zip(steps, runs):
        r["variant"] = " ".join(argv[len(rest):])
        print(step_line(r, bench.peak_tflops))
    if len(bench.methods) > 1:
        base = steps[0]
        print("relative images/s: " + ", ".join(f"{r['method']}{' ' + r['variant'] if r['variant'] else ''} "
                                                f"{r['images_per_s'] / base['images_per_s']:.2f}" for r in steps))
    if len(variants) > 1:
        for k in range(0, len(steps), len(variants)):
            base, *others = steps[k:k + len(variants)]
            print(f"{base['method']}: images/s relative to {base['variant'] or 'the flags given'}: " + ", ".join(
                f"{r['variant']} x{r['images_per_s'] / base['images_per_s']:.2f}" for r in others))
    if compare == ["grad_checkpointing"]:
        for plain, ckpt in zip(steps[::2], steps[1::2]):
            print(f"{plain['method']} with --grad_checkpointing: peak memory {ckpt['memory'] / 2**30:.2f} vs "
                  f"{plain['memory'] / 2**30:.2f} GiB ({plain['memory_kind']}; saves {(plain['memory'] - ckpt['memory']) / 2**30:.2f} GiB),"
                  f" images/s x{ckpt['images_per_s'] / plain['images_per_s']:.2f}")
    if bench.loader:
        args = importlib.import_module(bench.methods[0]).get_args(rest)
        print_loader(args, *measure_loader(args, bench.loader_images, bench.loader_rounds),
                     [r for r in steps if not r["grad_checkpointing"]])


if __name__ == "__main__":
    main()
