"""--grad_checkpointing and --photometric device through each method's own training loop."""
import importlib
import json
import os

import numpy as np
import pytest

import test_dino_train
import test_dinov2_train
import test_simdino_train
import test_simdinov2

TINY = {"simdino": test_simdino_train.TINY, "dino": test_dino_train.TINY,
        "simdinov2": test_simdinov2.TINY, "dinov2": test_dinov2_train.TINY}
METHODS = list(TINY)


def losses(method, out, *extra):
    m = importlib.import_module(method)
    m.train(m.get_args(TINY[method] + ["--epochs", "1", "--warmup_epochs", "0", "--output_dir", str(out), *extra]))
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.parametrize("method", METHODS)
def test_grad_checkpointing_flag_reaches_the_student(method):
    m = importlib.import_module(method)
    student, teacher = m.build_networks(m.get_args(TINY[method] + ["--grad_checkpointing"]))
    assert student.backbone.grad_checkpointing and student.training
    assert not teacher.training                                     # eval: the teacher never checkpoints
    student, _ = m.build_networks(m.get_args(TINY[method]))
    assert not student.backbone.grad_checkpointing                  # off by default


def test_grad_checkpointing_leaves_the_training_run_unchanged(tmp_path):
    # same seed, same views, same drop path: the recomputed activations give the same updates
    plain = losses("simdino", tmp_path / "plain")
    ckpt = losses("simdino", tmp_path / "ckpt", "--grad_checkpointing")
    assert len(plain) == len(ckpt) >= 4 and len(set(plain)) > 1
    np.testing.assert_allclose(ckpt, plain, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_with_device_photometric_and_grad_checkpointing(method, tmp_path):
    # on CPU --photometric auto means pil: this runs the batched path the GPU default takes
    device = losses(method, tmp_path / "device", "--photometric", "device", "--grad_checkpointing")
    pil = losses(method, tmp_path / "pil", "--photometric", "pil")
    assert len(device) == len(pil) >= 2 and np.isfinite(device).all()
    assert device != pil                                            # other views: other losses
