"""plot_runs.py's readers (matplotlib is optional, so only the parts that do not draw are tested here)."""
import json

import pytest
import torch

import plot_runs


def test_readers_put_each_knn_point_at_its_checkpoints_iteration(tmp_path):
    run = tmp_path / "simdino"
    run.mkdir()
    records = [{"iteration": i, "loss": 1.0 / (i + 1)} for i in range(5)] + [{"iteration": 3, "loss": 7.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))   # a resumed run redid 3
    for it, top1 in [(20, 41.5), (10, 33.0)]:
        ckpt = run / f"checkpoint{it:04d}.pth"
        torch.save({"iteration": it, "teacher": {}}, ckpt)
        result = {"checkpoint": str(ckpt), "knn": {"20": {"top1": top1, "top5": 90.0}}}
        if it == 10:
            result["init"] = {"seed": 0, "knn": {"20": {"top1": 30.4, "top5": 80.0}}}
        (run / f"checkpoint{it:04d}_knn.json").write_text(json.dumps(result))
    (run / "gone_knn.json").write_text(json.dumps({"checkpoint": str(run / "gone.pth"), "knn": {}}))
    log = plot_runs.read_log(str(run))
    assert [r["iteration"] for r in log] == [0, 1, 2, 3, 4] and log[3]["loss"] == 7.0
    points, init = plot_runs.read_knn(str(run), "20")
    assert points == [(10, 33.0), (20, 41.5)] and init == 30.4
    assert plot_runs.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_avgpool_results_and_the_raw_pixel_floor_are_read_apart_from_the_cls_curve(tmp_path):
    run = tmp_path / "p8_long"
    run.mkdir()
    ckpt = run / "checkpoint0002.pth"
    torch.save({"iteration": 500, "teacher": {}}, ckpt)
    for suffix, top1 in [("_knn.json", 40.0), ("_knn_avgpool.json", 41.2)]:
        result = {"checkpoint": str(ckpt), "features": "cls", "knn": {"20": {"top1": top1, "top5": 90.0}}}
        (run / f"checkpoint0002{suffix}").write_text(json.dumps(result))
    assert plot_runs.read_knn(str(run), "20") == ([(500, 40.0)], None)   # the pooled file is not a CLS point
    assert plot_runs.read_knn(str(run), "20", "_knn_avgpool.json") == ([(500, 41.2)], None)
    raw = tmp_path / "raw_pixels_knn.json"
    raw.write_text(json.dumps({"features": "raw_pixels", "data": "data/cifar10_holdout",
                               "knn": {"20": {"top1": 43.58}, "10": {"top1": 43.54}}}))
    assert plot_runs.read_raw_pixels(str(raw), "10") == ("data/cifar10_holdout", 43.54)
    with pytest.raises(SystemExit, match="not a --raw_pixels result"):   # a checkpoint's JSON is no floor
        plot_runs.read_raw_pixels(str(run / "checkpoint0002_knn.json"), "20")


def test_a_json_file_that_records_its_iteration_needs_no_checkpoint(tmp_path):
    """eval_knn.py's JSON repeats the checkpoint's iteration: the curve survives deleting the checkpoints, and the
    JSON's figure wins over a checkpoint file that now holds another iteration (a rerun into the same folder)."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"iteration": 999, "teacher": {}}, run / "checkpoint0001.pth")
    for name, it, top1 in [("checkpoint0001", 250, 36.4), ("checkpoint0011", 2750, 47.96)]:   # 0011.pth is gone
        result = {"checkpoint": str(run / f"{name}.pth"), "iteration": it, "knn": {"20": {"top1": top1}}}
        (run / f"{name}_knn.json").write_text(json.dumps(result))
    assert plot_runs.read_knn(str(run), "20") == ([(250, 36.4), (2750, 47.96)], None)
