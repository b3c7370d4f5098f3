"""Training throughput of a method's real training loop, with data loading taken out.

The method's own `train()` runs unchanged, except that its dataset is replaced by one that
returns the same random crops every time, so the number measures the step (student and
teacher forwards, loss, backward, optimiser, EMA, logging) and not JPEG decoding. The speed
is taken between two log records after `--warmup` steps (compilation excluded):

    python bench.py simdino --arch vit_base --batch_size_per_gpu 64                 # one GPU (or CPU)
    python bench.py simdinov2 --arch vit_large --batch_size_per_gpu 32 --compile --peak_tflops 989
    torchrun --nproc_per_node=8 bench.py dino --arch vit_base --fsdp

Everything after the method name goes to the method's own arguments. Prints one line: images/s,
ms per step, peak GPU memory, and the backbone's training FLOP rate (3x the forward FLOPs of the
student on all crops plus the teacher's forward on the global crops, heads not counted) and, with
--peak_tflops (e.g. 989 for dense bf16 on an H100 SXM), the model FLOP utilisation.
"""
import argparse
import importlib
import json
import os
import shutil
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

import vit


class RepeatedCrops(torch.utils.data.Dataset):
    """`length` samples that are all the same random multi-crop views (2 global + local crops)."""

    def __init__(self, length, args):
        g = torch.Generator().manual_seed(0)
        self.views = ([torch.randn(3, args.global_crops_size, args.global_crops_size, generator=g) for _ in range(2)]
                      + [torch.randn(3, args.local_crops_size, args.local_crops_size, generator=g)
                         for _ in range(args.local_crops_number)])
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.views, 0


def backbone_train_flops(args):
    """FLOPs of one training step of the backbones per image: 3 x student forward on every crop + teacher on the globals."""
    with torch.device("meta"):
        model = vit.build_vit(args.arch, patch_size=args.patch_size, img_size=args.global_crops_size,
                              num_register_tokens=args.num_register_tokens)
    flops = {}
    for size in {args.global_crops_size, args.local_crops_size}:
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, size, size, device="meta"))
        flops[size] = counter.get_total_flops()
    student = 3 * (2 * flops[args.global_crops_size] + args.local_crops_number * flops[args.local_crops_size])
    return student + 2 * flops[args.global_crops_size]


def main():
    p = argparse.ArgumentParser("bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["simdino", "simdinov2", "dino", "dinov2"])
    p.add_argument("--steps", default=30, type=int, help="Measured steps, after the warm-up.")
    p.add_argument("--warmup", default=10, type=int, help="Steps before the measurement (compilation, allocator).")
    p.add_argument("--peak_tflops", default=None, type=float, help="The device's peak TFLOP/s, for the MFU.")
    bench, rest = p.parse_known_args()
    method = importlib.import_module(bench.method)
    out = tempfile.mkdtemp(prefix="bench_")
    args = method.get_args(rest + ["--epochs", "1", "--warmup_epochs", "0", "--log_every", str(bench.warmup),
                                   "--saveckp_freq", "0", "--output_dir", out])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    n = (bench.warmup + bench.steps) * args.batch_size_per_gpu * world_size
    method.build_dataset = lambda *a, **k: RepeatedCrops(n, args)     # the method's loop, without data loading
    method.train(args)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    shutil.rmtree(out)                                             # the checkpoint it wrote is of no use
    first, last = log[0], log[-1]                                  # after the warm-up steps, and at the end
    steps = last["iteration"] - first["iteration"]
    seconds = last["time"] - first["time"]
    images_per_s = steps * args.batch_size_per_gpu * world_size / seconds
    tflops = backbone_train_flops(args) * images_per_s / 1e12
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else "n/a (CPU)"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    mfu = f", MFU {100 * tflops / (bench.peak_tflops * world_size):.1f}%" if bench.peak_tflops else ""
    print(f"{bench.method} {args.arch}/{args.patch_size} on {world_size} x {device}, batch {args.batch_size_per_gpu}"
          f"/process, {'compiled' if args.compile else 'eager'}: {images_per_s:.1f} images/s, "
          f"{1000 * seconds / steps:.1f} ms/step, peak memory {memory}, backbone {tflops:.2f} TFLOP/s{mfu}")


if __name__ == "__main__":
    main()
