"""The parts the four method files share are written out in each file (one file, the whole method), and kept
identical: every definition listed here has the same source, to the character, in the files named with it,
so that `diff -u dino.py simdino.py` shows only what the methods change."""
import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ("simdino.py", "dino.py", "simdinov2.py", "dinov2.py")
SHARED = {
    # the recipe
    "cosine_schedule": ("simdino.py", "dino.py", "dinov2.py"), "grad_norms": ALL, "update_teacher": ALL,
    # the run machinery, under the banner that says it is the same in the four files
    "start_run": ALL, "run_length": ALL, "run_loader": ALL, "init_distributed": ALL, "distribute": ALL,
    "seed_all": ALL, "stream_seed": ALL, "RunSampler": ALL, "SeededViews": ALL, "seeded_collate": ALL,
    "worker_init": ALL, "stop_on_signals": ALL, "Progress": ALL, "open_log": ALL, "note_cpu_hours": ALL,
    "save_training_state": ALL, "save_checkpoint": ALL, "resume_run": ALL, "load_training_state": ALL,
    "load_optimizer_state": ALL, "load_pretrained": ALL, "fail": ALL, "HelpFormatter": ALL, "Ranged": ALL,
    "int_or_auto": ALL, "add_run_flags": ALL, "check_shared_args": ALL, "in_interval": ALL,
    "use_bf16": ALL, "claim_output_dir": ALL, "release_output_dir": ALL, "os_problem": ALL, "progress_made": ALL,
    "peers_gone": ALL, "stop_if_peer_lost": ALL, "tensor_bytes": ALL, "RawFile": ALL, "write_atomically": ALL,
    "write_problem": ALL, "remove_quietly": ALL,
    # within a family: DINO's recipe in both v1 files, DINOv2's in both v2 files, the coding rate in both Sim files
    "Network": ("simdino.py", "dino.py"), "param_groups": ("simdino.py", "dino.py"),
    "clip_gradients": ("simdino.py", "dino.py"), "clip_parts": ("simdinov2.py", "dinov2.py"),
    "patch_weights": ("simdinov2.py", "dinov2.py"),
    "coding_rate": ("simdino.py", "simdinov2.py"), "released_gamma": ("simdino.py", "simdinov2.py"),
    "coding_rate_group": ("simdino.py", "simdinov2.py"), "default_cov_group_size": ("simdino.py", "simdinov2.py"),
}
# Deliberate differences, with their reasons: each method's own model, loss, recipe, train() and flags
# (build_parser, and check_args for the checks no single flag's range expresses);
# simdinov2.py's cosine_schedule (the SimDINO release's scheduler warms up by i / W, where DINO's and DINOv2's
# np.linspace give i / (W - 1));
# clip_gradients of the v2 files (DINOv2 clips each head on its own: one head in SimDINOv2, two in DINOv2);
# the v2 files' param_groups (DINOv2's layer-wise decay, and its prototype layers' group for the frozen epoch).


@functools.lru_cache(maxsize=None)   # each file parsed once, not once per definition
def definitions(name):
    with open(os.path.join(ROOT, name)) as f:
        src = f.read()
    return {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_definition_is_identical(name):
    sources = {f: definitions(f).get(name) for f in SHARED[name]}
    assert all(sources.values()), f"{name} missing in {[f for f, s in sources.items() if s is None]}"
    first = SHARED[name][0]
    for f, src in sources.items():
        assert src == sources[first], f"{name} differs between {first} and {f}: make them the same, or list why"


def machinery(name):
    """The text of a method file from the run machinery's banner to its own flags."""
    with open(os.path.join(ROOT, name)) as f:
        src = f.read()
    start, end = src.index("# The run machinery."), src.index("- this method's flags\n")
    assert start < end, f"{name}: the run machinery must come before the method's flags"
    return src[start:end]


def test_the_run_machinery_block_is_the_same_text_in_every_method_file():
    """The banner's promise: everything from it to the method's flags can be skipped, because it is one text."""
    texts = {f: machinery(f) for f in ALL}
    for f, text in texts.items():
        assert text == texts[ALL[0]], f"the run machinery of {f} differs from {ALL[0]}'s"
    assert "def Progress" not in texts[ALL[0]] and "class Progress" in texts[ALL[0]]   # the block is the real one


def test_method_files_have_no_line_over_120_columns():
    for name in ALL:
        with open(os.path.join(ROOT, name)) as f:
            long = [i + 1 for i, line in enumerate(f) if len(line.rstrip("\n")) > 120]
        assert not long, f"{name}: lines {long} are longer than 120 columns"
