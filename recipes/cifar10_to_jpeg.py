"""Write CIFAR-10 as the ImageFolder tree of JPEGs that the CIFAR-10 recipe and its figures used.

    python recipes/cifar10_to_jpeg.py ROOT data/cifar10

reads torchvision's CIFAR-10 files, ROOT/cifar-10-batches-py/ (downloaded into ROOT first if they are not
there, 163 MB, the same files `--data cifar10:ROOT` reads), and writes

    data/cifar10/train/<class>/0000.jpg ... 4999.jpg    50,000 images
    data/cifar10/test/<class>/0000.jpg ... 0999.jpg     10,000 images

<class> the names of batches.meta (airplane, automobile, ..., truck); each class's images numbered from 0000
in the order they come in data_batch_1 ... data_batch_5 (train) and test_batch (test). Each 32 x 32 image is
saved by PIL as a baseline JPEG at quality 75 with 4:2:0 chroma subsampling and the standard Huffman tables
(no optimisation), about 0.9 KB each: the settings of the tree the documented runs read, whose quantisation
tables, sampling factors and headers this reproduces byte for byte (docs/cifar10.md).

The tree is written into OUT.partial and renamed to OUT at the end, so an interrupted export leaves no
half tree behind; an existing OUT is refused.
"""
import argparse
import os
import shutil
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data.py, from the project root
import data  # noqa: E402

JPEG = dict(format="JPEG", quality=75, subsampling="4:2:0", optimize=False, progressive=False)


def build_parser():
    p = argparse.ArgumentParser("cifar10_to_jpeg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="Folder holding (or to receive) torchvision's cifar-10-batches-py/.")
    p.add_argument("out", help="The tree to write (train/ and test/ under it); must not exist yet.")
    return p


def export(root, out):
    """Write the tree; returns {split: number of images written}."""
    if os.path.exists(out):
        raise data.DataError(f"'{out}' already exists: remove it, or pass another output folder")
    partial = out.rstrip("/\\") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)            # the leftover of an interrupted export
    counts = {}
    try:
        for folder in ("train", "test"):
            ds = data.CIFAR10Dataset(root, folder)         # downloads into root once if the files are missing
            seen = [0] * len(ds.classes)
            for image, label in zip(ds.images, ds.targets):
                d = os.path.join(partial, folder, ds.classes[label])
                if seen[label] == 0:
                    os.makedirs(d)
                Image.fromarray(image).save(os.path.join(d, f"{seen[label]:04d}.jpg"), **JPEG)
                seen[label] += 1
            counts[folder] = sum(seen)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return counts


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        counts = export(args.root, args.out)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot write '{args.out}' ({e.strerror or type(e).__name__}): check the folder "
                 f"and the free space")
    print(f"wrote {counts['train']:,} train and {counts['test']:,} test JPEGs to '{args.out}'")


if __name__ == "__main__":
    main()
