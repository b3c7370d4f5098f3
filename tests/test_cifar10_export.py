"""recipes/cifar10_to_jpeg.py on a small fake CIFAR-10 in torchvision's pickle-batch format: the tree's layout,
the order of the files, the JPEG settings of the tree the documented runs used, and its clean errors."""
import hashlib
import importlib.util
import os
import pickle

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "recipes", "cifar10_to_jpeg.py")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# SHA-256 of the bytes before the scan data (JFIF, quantisation, frame and Huffman segments, the scan header),
# the same in every JPEG of the CIFAR-10 tree the documented runs read: quality 75, 4:2:0, standard tables
MEASURED_HEADER = "939b3cd169d32b17a618cc80f53ff44c7905deb9901c27e3bc2a7c796d359a90"


def header(raw):
    """The JPEG's bytes up to the end of its start-of-scan segment."""
    i = 2
    while True:
        marker, length = raw[i + 1], int.from_bytes(raw[i + 2:i + 4], "big")
        i += 2 + length
        if marker == 0xDA:
            return raw[:i]


def fake_cifar10(root, per_batch=12):
    """cifar-10-batches-py/ with 5 training batches and a test batch of per_batch images each. Image j of the
    whole split is one flat colour that encodes j, so a decoded file says which image it was."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch}, f)
    rng = np.random.default_rng(0)
    splits = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        labels, j = [], 0
        for name in names:
            batch_labels = rng.integers(0, 10, per_batch).tolist()
            colours = np.array([[8 * ((j + n) % 30), 255 - 8 * ((j + n) // 30), 128] for n in range(per_batch)])
            pixels = np.repeat(colours[:, :, None], 1024, axis=2).reshape(per_batch, 3072).astype(np.uint8)
            with open(os.path.join(folder, name), "wb") as f:   # as the CIFAR-10 site's pickles hold them
                pickle.dump({"batch_label": name, "labels": batch_labels, "data": pixels,
                             "filenames": [f"{j + n}.png" for n in range(per_batch)]}, f)
            labels += batch_labels
            j += per_batch
        splits[split] = labels
    return splits


spec = importlib.util.spec_from_file_location("cifar10_to_jpeg", SCRIPT)
cifar10_to_jpeg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar10_to_jpeg)


def error_of(argv):
    """The message main() exits with (Python prints it to stderr and exits with status 1)."""
    with pytest.raises(SystemExit) as e:
        cifar10_to_jpeg.main(argv)
    return e.value.code


def test_export_writes_the_measured_tree(tmp_path, capsys):
    labels = fake_cifar10(tmp_path / "cifar")
    out = tmp_path / "tree"
    cifar10_to_jpeg.main([str(tmp_path / "cifar"), str(out)])
    assert capsys.readouterr().out.strip() == f"wrote {len(labels['train'])} train and {len(labels['test'])} test JPEGs to '{out}'"
    assert sorted(os.listdir(out)) == ["test", "train"]
    assert not os.path.exists(str(out) + ".partial")
    for split, split_labels in labels.items():
        present = sorted({CLASSES[t] for t in split_labels})
        assert sorted(os.listdir(out / split)) == present
        for c in present:
            # the class's images in the order of the batches, numbered from 0000
            expected = [j for j, t in enumerate(split_labels) if CLASSES[t] == c]
            files = sorted(os.listdir(out / split / c))
            assert files == [f"{i:04d}.jpg" for i in range(len(expected))]
            for name, j in zip(files, expected):
                path = out / split / c / name
                raw = path.read_bytes()
                assert hashlib.sha256(header(raw)).hexdigest() == MEASURED_HEADER
                with Image.open(path) as im:
                    assert (im.format, im.size, im.mode) == ("JPEG", (32, 32), "RGB")
                    assert JpegImagePlugin.get_sampling(im) == 2          # 4:2:0
                    mean = np.asarray(im, dtype=np.float64).mean(axis=(0, 1))
                np.testing.assert_allclose(mean, [8 * (j % 30), 255 - 8 * (j // 30), 128], atol=3)


def test_export_refuses_an_existing_folder_and_a_broken_batch(tmp_path):
    fake_cifar10(tmp_path / "cifar", per_batch=2)
    (tmp_path / "tree").mkdir()
    assert error_of([str(tmp_path / "cifar"), str(tmp_path / "tree")]) == f"error: '{tmp_path / 'tree'}' already exists: remove it, or pass another output folder"

    (tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    message = error_of([str(tmp_path / "cifar"), str(tmp_path / "tree2")])
    assert message.startswith("error: cannot read CIFAR-10 file") and "\n" not in message
    assert not os.path.exists(tmp_path / "tree2") and not os.path.exists(tmp_path / "tree2.partial")


@pytest.mark.parametrize("argv", [[], ["only_root"]])
def test_export_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cifar10_to_jpeg.main(argv)
    assert e.value.code == 2 and "usage: cifar10_to_jpeg" in capsys.readouterr().err
