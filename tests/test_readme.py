"""The README and docs/*.md say only what the code accepts: every `python X.py ...` and `torchrun ... X.py ...`
command in their code blocks names a file that exists and passes only flags its parser declares; every linked
file, figure and section exists; the README stays a front door (under 300 lines)."""
import argparse
import glob
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def code_blocks(text):
    """(info string, body) of each fenced code block."""
    return re.findall(r"^```([^\n`]*)\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(body):
    """The commands of a shell block as token lists: continuation lines joined, comments dropped, split at
    && ; | and for/while/do, leading VAR=value assignments dropped."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:                                      # an unbalanced quote: not a command line
            continue
        current = []
        for t in tokens + [";"]:
            if t in ("&&", "||", ";", "|") or t.endswith(";"):
                if t.endswith(";") and t != ";":
                    current.append(t[:-1])
                while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            elif not current and t in ("do", "then", "done", "fi"):
                continue
            else:
                current.append(t)
    return commands


def script_calls(page):
    """[(script path, its arguments, the command as written)] of the page's python / torchrun commands."""
    calls = []
    for info, body in code_blocks(read(page)):
        if info.strip() not in ("", "bash", "sh", "shell", "console"):
            continue
        for cmd in shell_commands(body):
            if cmd[0] not in ("python", "python3", "torchrun"):
                continue
            if cmd[0].startswith("python") and cmd[1:2] in (["-m"], ["-c"], ["-"]):
                continue                                        # python -m pytest, -c / stdin code: not a script
            scripts = [i for i, t in enumerate(cmd) if t.endswith(".py")]
            assert scripts, f"{page}: no script in `{' '.join(cmd)}`"
            i = scripts[0]
            calls.append((cmd[i], cmd[i + 1:], " ".join(cmd)))
    return calls


class Captured(Exception):
    pass


def parser_of(script):
    """The argparse parser a script builds, taken as it is about to parse (nothing runs past that point)."""
    spec = importlib.util.spec_from_file_location("readme_" + re.sub(r"\W", "_", script), os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "build_parser"):
        return module.build_parser()
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise Captured(self)
    argparse.ArgumentParser.parse_known_args = capture
    try:
        (module.get_args if hasattr(module, "get_args") else module.main)()
    except Captured as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{script} built no parser")


PARSERS = {}


def flags_of(script):
    if script not in PARSERS:
        parser = parser_of(script)
        PARSERS[script] = (parser, {o for a in parser._actions for o in a.option_strings})
    return PARSERS[script]


CALLS = [(page, *call) for page in PAGES for call in script_calls(page)]


def test_the_pages_have_commands():
    """The parsing above finds the commands it checks (a broken parser must not pass by checking nothing)."""
    readme = [c for c in CALLS if c[0] == "README.md"]
    assert len(readme) >= 10
    assert {"simdino.py", "eval_knn.py", "visualize_attention.py"} <= {os.path.basename(c[1]) for c in readme}


@pytest.mark.parametrize("page,script,args,command", CALLS, ids=[f"{c[0]}:{c[1]}" for c in CALLS])
def test_command_names_a_file_and_known_flags(page, script, args, command):
    assert os.path.isfile(os.path.join(ROOT, script)), f"{page}: `{command}` names a file that does not exist"
    parser, known = flags_of(script)
    if os.path.basename(script) == "bench.py":               # bench.py passes the rest on to the method's parser
        methods = [a for a in args if os.path.isfile(os.path.join(ROOT, a + ".py")) and not a.startswith("-")]
        for m in methods:
            known = known | flags_of(m + ".py")[1]
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"{page}: `{command}` passes {unknown}, which {script} does not declare"
    if "..." not in args and "--help" not in args and os.path.basename(script) != "bench.py":
        parser.parse_args(args)                              # values and counts too; SystemExit(2) if not


def links(page):
    """(target, anchor) of every relative markdown link and image of a page, relative to the project root."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
        if re.match(r"[a-z]+:", target):
            continue                                          # https: and the like
        path, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        out.append((path, anchor))
    return out


def anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", read(page), flags=re.S | re.M)
    heads = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES)
def test_links_and_figures_exist(page):
    found = links(page)
    for path, anchor in found:
        assert os.path.exists(os.path.join(ROOT, path)), f"{page} links {path}, which does not exist"
        if anchor and path.endswith(".md"):
            assert anchor in anchors(path), f"{page} links {path}#{anchor}, a section {path} does not have"
    if page == "README.md":
        linked = {p for p, _ in found}
        assert {"docs/cifar10.md", "docs/fidelity.md"} <= linked


def test_every_doc_is_linked_from_the_readme():
    linked = {p for p, _ in links("README.md")}
    assert set(PAGES[1:]) <= linked, f"not linked from the README: {sorted(set(PAGES[1:]) - linked)}"


def test_readme_is_a_front_door():
    lines = read("README.md").splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move the details into docs/"
