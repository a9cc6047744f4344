"""Every command and Python snippet in README.md and docs/*.md works as written (issue 9 §4).

Every ```bash and ```python block is checked:

* **Every command** of every bash block is checked statically: ``python tools/X.py ARGS`` (and ``bench/``) must
  be accepted by that tool's own argument parser (option names, counts, choices, number types; paths and
  devices are not looked up, so ``/models/...`` and ``--device cuda`` pass), ``configs/...`` paths must exist,
  ``make`` targets must be in the Makefile, ``pip install -e ".[x,y]"`` extras must be in setup.py,
  ``python -c`` code must compile. A command of a kind this file does not know fails, so a new kind gets a rule.
* **Blocks in RUN** are then executed for real with bash, in a sandbox holding the repository and the data
  ``make demo`` generates (``data/toy_seg``, ``data/toy_digits``), with ``python`` = this interpreter.
* **Every Python block** is compiled; blocks in EXECUTE also run, in a fresh interpreter in the sandbox.
* Every block that is not run is in NOT_RUN with the reason (a released checkpoint, a GPU, ADE20K, minutes of
  training). :func:`test_every_block_has_one_decision` fails for a new block until it is given one.

Decisions name a block by its file and the start of its first command line, so editing the rest of a block keeps
its decision.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FIXTURES = os.environ.get("INTERNVIT_FIXTURES", os.path.join(os.path.dirname(ROOT), "shared", "fixtures"))
LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}


@dataclass
class Block:
    file: str
    line: int
    lang: str
    text: str

    @property
    def first(self) -> str:
        """The first line that is not blank or a comment (what a decision names the block by)."""
        return next((ln.strip() for ln in self.text.splitlines() if ln.strip() and not ln.strip().startswith("#")),
                    "")

    @property
    def key(self) -> str:
        return f"{self.file}:{self.line}: {self.first[:60]}"


def extract_blocks() -> list[Block]:
    blocks = []
    fence = re.compile(r"^(\s*)```(\w*)\s*$")
    for rel in DOCS:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            lines = f.read().split("\n")
        i = 0
        while i < len(lines):
            m = fence.match(lines[i])
            if not m:
                i += 1
                continue
            j = i + 1
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                j += 1
            lang = LANGS.get(m.group(2).lower())
            if lang:
                blocks.append(Block(rel, i + 2, lang, textwrap.dedent("\n".join(lines[i + 1:j]))))
            i = j + 1
    return blocks


BLOCKS = extract_blocks()

# --------------------------------------------------------------------------------------------------------------
# Decisions: every block is run / executed, or says why not.
# --------------------------------------------------------------------------------------------------------------
RUN = [
    "docs/features.md: python tools/make_toy_seg_dataset.py data/toy_seg",
]
EXECUTE = [
    "docs/segmentation.md: backbone = dict(",
    "docs/segmentation.md: optim_wrapper = dict(",
    "docs/segmentation.md: import segmentation",
]
CKPT = "needs a released checkpoint (/models/..., pretrained/...), which the repository does not ship"
TRAINS = "trains for minutes (make demo runs the same; every command is parse-checked here)"
NOT_RUN = {
    "README.md: make demo": "is make demo / make test itself (the targets are checked)",
    "README.md: source .venv/bin/activate": "changes the calling shell (the venv path is checked against the Makefile)",
    "README.md: pip install -e": "installs packages (the extras are checked against setup.py)",
    "README.md: import torch, internvit": CKPT,
    "README.md: model = internvit.load_model(\"/models/InternVL-14B-224px\"": CKPT,
    "README.md: python tools/extract_features.py --model /models/": CKPT,
    "README.md: bash tools/dist_train.sh": "needs 8 GPUs, ADE20K and the 6B checkpoint",
    "README.md: python tools/build_index.py images/ out/index --model internvl-g:/models/": CKPT,
    "README.md: python tools/serve.py out/index": "starts a server that runs until stopped (the demo's "
        "tools/demo_serve.py runs it against the demo index)",
    "docs/classification.md: python tools/make_toy_cls_dataset.py data/toy_digits": TRAINS,
    "docs/classification.md: bash tools/dist_train.sh": "needs 8 GPUs, ImageNet and the 6B checkpoint",
    "docs/classification.md: from classification import convert_head_checkpoint": CKPT,
    "docs/classification.md: python tools/train.py configs/classification/toy/digits_linear_probe.py --work-dir "
    "work_dirs/mine": "needs a pets dataset and the 300M checkpoint",
    "docs/classification.md: import classification": CKPT + "; also needs ImageNet",
    "docs/classification.md: pip install -e \".[classification,video]\"": "needs Kinetics videos and the 14B "
        "checkpoint",
    "docs/classification.md: from classification.video import": "needs Kinetics videos, a GPU and the 14B checkpoint",
    "docs/features.md: import internvit": CKPT + "; also needs a folder photos/ and a GPU",
    "docs/features.md: from internvit.transforms import tile_grid": "continues with the user's image `img`",
    "docs/features.md: fx = internvit.FeatureExtractor(model, tiles=12": "continues with a loaded 448-px model and "
        "the user's folder scans/",
    "docs/features.md: python tools/extract_features.py --model /models/InternViT-300M-448px-V2_5 --images photos/":
        CKPT + "; also needs the user's folder photos/ and a GPU",
    "docs/features.md: python tools/extract_features.py --model /models/InternViT-300M-448px --images scans/": CKPT,
    "docs/internvl.md: import internvit": CKPT + "; also needs a GPU",
    "docs/internvl.md: model = internvit.load_model(\"internvl_c_13b_224px.pth\"": CKPT,
    "docs/internvl.md: from internvit.openclip_adapter import": CKPT,
    "docs/internvl.md: from classification import build_zero_shot_classifier": "continues the blocks above "
        "(a loaded InternVL model, its tokenizer and a data loader)",
    "docs/internvl.md: python tools/zeroshot_eval.py --model /models/": CKPT + "; also needs ImageNet",
    "docs/retrieval.md: python tools/build_index.py images/ out/index --model internvl-g:/models/": CKPT,
    "docs/retrieval.md: import retrieval": CKPT + "; also needs Flickr30K",
    "docs/retrieval.md: python tools/make_demo_retrieval_data.py data/toy_digits_pairs": TRAINS,
    "docs/retrieval.md: python3 -m venv /tmp/af": "a benchmark: installs autofaiss into another venv, runs for "
        "minutes",
    "docs/segmentation.md: python tools/convert_checkpoint.py mmseg0x": CKPT + " (a released mmseg 0.x segmentor)",
    "docs/finetune.md: bash tools/dist_train.sh": "needs 8 GPUs, Flickr30K and the 14B checkpoint",
    "docs/finetune.md: python tools/build_index.py my_images/": "needs a fine-tuned model and the user's images",
    "docs/scale.md: python tools/build_index.py embeddings/": "needs a user's embeddings folder larger than memory",
    "docs/scale.md: from retrieval import build_index": "needs a user's embeddings folder larger than memory",
    "docs/scale.md: python tools/build_index.py part0/": "needs two parts of a user's collection",
    "docs/scale.md: from retrieval.search import Retriever": "continues the block above (indexes idx0, idx1)",
    "docs/scale.md: python tools/build_index.py /data/emb_part$k": "a billion-scale build on M machines",
    "docs/scale.md: python tools/serve.py all=idx0,idx1": "starts a server that runs until stopped "
        "(tests/retrieval/test_serve_sharded.py serves a group of folders the same way)",
    "docs/serve.md: pip install -e": "installs packages (the extras are checked against setup.py)",
    "docs/serve.md: from retrieval.serve import": "needs an index at out/index (tests/retrieval/test_serve.py runs "
        "the same calls)",
    "docs/serve.md: python -m pytest": "runs test files and a benchmark (the files and options are checked)",
    "docs/segmentation.md: OMP_NUM_THREADS=1 python tools/make_toy_seg_dataset.py data/toy_seg": TRAINS,
}


def _matches(decision: str, block: "Block") -> bool:
    file, _, prefix = decision.partition(": ")
    return block.file == file and block.first.startswith(prefix)


def _decided(block: "Block", decisions) -> bool:
    return any(_matches(d, block) for d in decisions)


def _blocks(lang=None):
    return [pytest.param(b, id=b.key) for b in BLOCKS if lang is None or b.lang == lang]


def test_every_block_has_one_decision():
    decisions = [*RUN, *EXECUTE, *NOT_RUN]
    undecided = [b.key for b in BLOCKS if sum(_matches(d, b) for d in decisions) != 1]
    assert not undecided, ("blocks without exactly one decision (add each to RUN, EXECUTE or NOT_RUN with a "
                           f"reason, named by file and first line): {undecided}")
    unused = [d for d in decisions if sum(_matches(d, b) for b in BLOCKS) != 1]
    assert not unused, f"decisions that name no block or several: {unused}"
    assert not any(_decided(b, RUN) for b in BLOCKS if b.lang == "python"), "RUN is for bash blocks"
    assert not any(_decided(b, EXECUTE) for b in BLOCKS if b.lang == "bash"), "EXECUTE is for python blocks"


# --------------------------------------------------------------------------------------------------------------
# Static checks of every command
# --------------------------------------------------------------------------------------------------------------
def commands(text: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split at ``&&`` / ``;``,
    leading ``VAR=value`` assignments removed, ``[...]`` optional-argument brackets dropped, shell expansions
    (``$k``, ``$(nproc)``, ``$((k * N))``) replaced by ``1``."""
    out = []
    text = re.sub(r"\$\(\([^)]*\)\)|\$\([^)]*\)|\$\{?\w+\}?", "1", text)  # shell expansions: a value
    for line in text.replace("\\\n", " ").splitlines():
        # `[--opt VALUE]`: the docs' mark for optional arguments, checked as if given
        tokens = [t[1:] if t.startswith("[") and "]" not in t[1:-1] else t for t in shlex.split(line, comments=True)]
        tokens = [t[:-1] if t.endswith("]") and "[" not in t else t for t in tokens]
        cmd: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";", "||"):
                while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    return out


class _Captured(BaseException):  # BaseException: passes through the tools' own error handling
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


class _ParseError(Exception):
    pass


#: argument types that look things up on this machine (files, devices): not applied when parse-checking
_ENVIRONMENT_TYPES = {"existing_path", "existing_file", "existing_dir", "device"}


def _loosen(parser: argparse.ArgumentParser) -> None:
    def error(message):
        raise _ParseError(message)

    parser.error = error
    for action in parser._actions:
        if getattr(action.type, "__name__", None) in _ENVIRONMENT_TYPES:
            action.type = None
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _loosen(sub)


def tool_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser a tool builds, captured at its first ``parse_args`` call (nothing else runs)."""
    original, saved_argv = argparse.ArgumentParser.parse_args, sys.argv

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    raise AssertionError(f"{script} never called parse_args")


def check_parses(script: str, argv: list[str]) -> None:
    parser = tool_parser(script)
    _loosen(parser)
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # --help
        assert e.code in (0, None), f"{script} {argv}: exit {e.code}"
    except _ParseError as e:
        raise AssertionError(f"{os.path.relpath(script, ROOT)} does not accept {shlex.join(argv)}: {e}") from None


def _makefile_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        return set(re.findall(r"^([A-Za-z][\w-]*):", f.read(), flags=re.M))


def _setup_extras() -> set[str]:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        text = f.read()
    body = re.search(r"^EXTRAS = \{(.*?)^\}", text, flags=re.S | re.M).group(1)
    return set(re.findall(r'^\s*"([\w-]+)":', body, flags=re.M)) | set(re.findall(r'EXTRAS\["([\w-]+)"\]', text))


PYTHONS = {"python", "python3", ".venv/bin/python"}


def check_command(cmd: list[str]) -> None:
    """Statically check one command (raises AssertionError naming what is wrong)."""
    for arg in cmd:
        if arg.startswith(("configs/", "tools/", "bench/")):
            assert os.path.exists(os.path.join(ROOT, arg)), f"{arg}: no such file in the repository"
    head, rest = cmd[0], cmd[1:]
    if head == "make":
        missing = [t for t in rest if not t.startswith("-") and t not in _makefile_targets()]
        assert not missing, f"make targets {missing} are not in the Makefile"
    elif head == "source":
        assert rest == [".venv/bin/activate"], f"source {rest}: expected .venv/bin/activate"
        with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
            assert re.search(r"^VENV \?= \.venv$", f.read(), flags=re.M), "the Makefile's venv is not .venv"
    elif head.endswith("pip") or (head in PYTHONS and rest[:2] == ["-m", "pip"]):
        args = rest[2:] if head in PYTHONS else rest
        assert args and args[0] == "install", f"pip {args}: only pip install is documented"
        for i, a in enumerate(args):
            if a == "-r":
                assert os.path.isfile(os.path.join(ROOT, args[i + 1])), f"{args[i + 1]}: missing"
            m = re.fullmatch(r"\.\[([\w,-]+)\]", a)
            if m:
                unknown = set(m.group(1).split(",")) - _setup_extras()
                assert not unknown, f"pip install extras {sorted(unknown)} are not in setup.py"
    elif head in PYTHONS and rest[:2] == ["-m", "venv"]:
        pass
    elif head in PYTHONS and rest[:2] == ["-m", "pytest"]:
        for a in rest[2:]:
            if not a.startswith("-"):
                assert os.path.exists(os.path.join(ROOT, a.split("::")[0])), f"{a}: no such test file"
    elif head == "bash" and rest and rest[0].startswith("tools/") and rest[0].endswith(".sh"):
        if rest[0] == "tools/dist_train.sh":
            assert len(rest) >= 3 and rest[2].isdigit(), "dist_train.sh CONFIG NUM_GPUS [options]"
    elif head in PYTHONS and rest and rest[0] == "-c":
        compile(rest[1], "<python -c>", "exec")
    elif head in PYTHONS and rest and rest[0].startswith(("tools/", "bench/")) and rest[0].endswith(".py"):
        check_parses(os.path.join(ROOT, rest[0]), rest[1:])
    else:
        raise AssertionError(f"no rule to check {shlex.join(cmd)!r} (add one to tests/test_docs_snippets.py)")


@pytest.mark.parametrize("block", _blocks("bash"))
def test_commands_are_accepted(block):
    cmds = commands(block.text)
    assert cmds, f"{block.file}:{block.line}: an empty bash block"
    previous: dict = {}
    for cmd in cmds:
        if "..." in cmd and len(cmd) > 1 and cmd[1] in previous:
            # `python tools/X.py ... --flag`: the docs' shorthand for "the last full X command, plus --flag"
            i = cmd.index("...")
            cmd = cmd[:i] + previous[cmd[1]] + cmd[i + 1:]
        elif len(cmd) > 1:
            previous[cmd[1]] = cmd[2:]
        check_command(cmd)


@pytest.mark.parametrize("block", _blocks("python"))
def test_python_compiles(block):
    compile(block.text, f"{block.file}:{block.line}", "exec")


# --------------------------------------------------------------------------------------------------------------
# Running: a sandbox with the repository and the data `make demo` generates
# --------------------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _sh(script: str, cwd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> str:
    """``<tmp>/repo``: the repository's files (linked) plus what `make demo` makes that the runnable blocks use:
    the toy datasets (made by the demo's own commands) and, for the MMSegInferencer snippet, a checkpoint of the
    toy segmentor at the path the demo's training writes (``work_dirs/demo_seg/iter_150.pth``; same config,
    untrained weights: 300 training iterations are minutes, and the snippet only needs a checkpoint that fits)."""
    import torch

    base = tmp_path_factory.mktemp("docs")
    repo = base / "repo"
    repo.mkdir()
    for name in os.listdir(ROOT):
        if name in {"data", "demo_out", "work_dirs", ".venv", ".git"} or name.startswith("."):
            continue
        os.symlink(os.path.join(ROOT, name), repo / name)
    if os.path.isdir(os.path.dirname(FIXTURES)):
        os.symlink(os.path.dirname(FIXTURES), base / "shared")  # ../shared/fixtures, as beside the repository
    demo = _sh("python tools/make_toy_seg_dataset.py data/toy_seg\n"
               "python tools/make_toy_cls_dataset.py data/toy_digits\n", str(repo))
    assert demo.returncode == 0, demo.stderr[-3000:]

    import importlib

    importlib.import_module("segmentation")  # before any mmseg import: registers InternViT, applies compat
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "toy", "upernet_internvit_tiny_toy.py"))
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(cfg.model)
    os.makedirs(repo / "work_dirs" / "demo_seg")
    torch.save({"state_dict": model.state_dict(), "meta": {}}, repo / "work_dirs" / "demo_seg" / "iter_150.pth")
    return str(repo)


@pytest.mark.parametrize("block", [b for b in _blocks("bash") if _decided(b.values[0], RUN)])
def test_run_block(block, sandbox):
    r = _sh(block.text, sandbox)
    assert r.returncode == 0, f"{block.file}:{block.line} failed (exit {r.returncode}):\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in _blocks("python") if _decided(b.values[0], EXECUTE)])
def test_execute_python_block(block, sandbox, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(block.text)
    r = subprocess.run([sys.executable, str(script)], cwd=sandbox, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{block.file}:{block.line} failed:\n{r.stderr[-3000:]}"
