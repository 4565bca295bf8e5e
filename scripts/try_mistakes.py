#!/usr/bin/env python
"""Make the mistakes a new user makes, against the real ``fedtune`` CLI, and grade each answer.

Every mistake runs ``python -m fedtune.cli ...`` in a subprocess (in a session of its
own, on tiny files this script writes: a config-built 2-layer BERT, a 120-row CSV)
and gets one line:

``clean``      a nonzero exit and one line of error (what fedtune promises);
``traceback``  a Python trace on the terminal;
``noisy``      a nonzero exit, but more than a few lines;
``silent``     exit 0, or no message at all: the mistake went unnoticed (for a mistake
               that is no error, e.g. evaluating an interrupted run, exit 0 is ``clean``
               when the output says what the user got);
``skipped``    the mistake cannot be made here (e.g. an unreadable file as root).

Lines that this machine's libraries print on every start (torchao's missing kernels,
torch's pytree notes) are not counted. ``--fast`` runs the subset the test suite runs
(tests/test_try_mistakes.py); the full list also makes one tiny run (about a minute)
for the mistakes made on a run directory. ``--markdown FILE`` writes the table of
docs/troubleshooting.md: mistake, the line fedtune prints, the fix.

Usage::

    python scripts/try_mistakes.py            # all 72, about 7 minutes on 2 busy cores
    python scripts/try_mistakes.py --fast     # the test's subset
    python scripts/try_mistakes.py --markdown docs/troubleshooting-table.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Lines some libraries print on every start on this machine (not fedtune's answer).
NOISE = re.compile(
    r"torchao|_pytree\.py|register_constant|Detected no triton|Generating train split"
)
#: More lines than this (after the noise) is ``noisy``.
MAX_LINES = 2


@dataclass
class Mistake:
    """One mistake: what a user types (``{run}``: a fresh run directory) and the fix."""

    name: str
    argv: list[str]
    fix: str
    fast: bool = False
    pipe: str = ""  # a shell command the output is piped into (``head -1``)
    needs_run: bool = False
    skip: str = ""  # why it cannot be tried here
    unreadable: bool = False  # root without the capability to read others' files
    setup: Callable[[Path], None] | None = None
    #: Not an error: exit 0 is right when a line of the output matches this (the answer
    #: must say what the user got, e.g. that a round was never evaluated).
    ok: str = ""


@dataclass
class Outcome:
    mistake: Mistake
    grade: str
    line: str
    seconds: float
    lines: list[str] = field(default_factory=list)


# -- fixtures ---------------------------------------------------------------------------


def make_fixtures(tmp: Path) -> dict[str, Path]:
    """A tiny model, a toy CSV, broken data and config files under ``tmp``."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedtune.model import default_model_path

    model = tmp / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(model))
    tokenizer.save_pretrained(str(model))
    words = {"animal": ["dog", "cat", "horse"], "food": ["bread", "soup"], "tool": ["saw", "drill"]}
    toy = tmp / "toy.csv"
    with toy.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(120):
            label = list(words)[i % 3]
            writer.writerow([f"a {words[label][i % len(words[label])]} number {i}", label])
    files = {"model": model, "toy": toy}
    data = {
        "empty.csv": b"",
        "header.csv": b"text,label\n",
        "quote.csv": b'text,label\ncat,animal\n"unterminated,food\n',
        "semicolon.csv": b"text;label\ncat;animal\nsoup;food\n",
        "one-label.csv": b"text,label\n" + b"".join(b"cat %d,animal\n" % i for i in range(20)),
        "notes.txt": b"text,label\ncat,animal\n",
        "bad.jsonl": b'{"text": "a", "label": "x"}\n{bad\n',
        "not-toml.toml": b"num-rounds: 3\n",
        "table.toml": b"[federation]\nnum-rounds = 3\n",
        "latin1.toml": "# café\nnum-rounds = 2\n".encode("latin-1"),
        "a-file": b"x",
        "typo.toml": b"num-round = 3\n",
        "list.toml": b'label-names = ["animal", "food", "tool"]\n',
        "quoted.toml": b'learning-rate = "fast"\n',
        "rounds-1e9.toml": b"num-rounds = 1e9\n",
        "epl.toml": b"examples-per-label = 250\n",
    }
    for name, content in data.items():
        (tmp / name).write_bytes(content)
        files[name] = tmp / name
    shutil.copy(toy, tmp / "locked.csv")
    (tmp / "locked.toml").write_text("num-rounds = 1\n")
    for name in ("locked.csv", "locked.toml"):  # unreadable but to root (see `attempt`)
        (tmp / name).chmod(0)
        files[name] = tmp / name
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    (tmp / "not-a-run").mkdir()
    files["full"], files["not-a-run"] = tmp / "full", tmp / "not-a-run"
    return files


def base(files: dict[str, Path], *extra: str, drop: str = "") -> list[str]:
    """``--set`` of a tiny run's settings and ``extra`` (less the key ``drop``: a file sets it)."""
    settings = [
        f"model-path={files['model']}",
        f"data-path={files['toy']}",
        "num-clients=2",
        "num-rounds=1",
        "max-examples=60",
        "batch-size=8",
        "lora-rank=4",
    ]
    kept = [s for s in [*settings, *extra] if not drop or not s.startswith(f"{drop}=")]
    return [a for s in kept for a in ("--set", s)]


def sim(files: dict[str, Path], *extra: str) -> list[str]:
    return ["simulate", "--run-dir", "{run}", *base(files, *extra)]


def mistakes(f: dict[str, Path], run: Path) -> list[Mistake]:
    dp = ("dp=example", "label-names=animal,food,tool", "target-delta=1e-3")
    return [
        Mistake("a key misspelt", sim(f, "num-round=3"), "spell the key as --help lists it", True),
        Mistake("a word for a number", sim(f, "num-rounds=three"), "give a number"),
        Mistake("zero rounds", sim(f, "num-rounds=0"), "num-rounds >= 1"),
        Mistake("a negative learning rate", sim(f, "learning-rate=-1"), "a positive rate"),
        Mistake("LoRA rank 0", sim(f, "lora-rank=0"), "lora-rank >= 1"),
        Mistake("fraction-train above 1", sim(f, "fraction-train=1.5"), "a fraction in (0, 1]"),
        Mistake("δ of 2", sim(f, *dp, "target-delta=2"), "a δ well under 1/n"),
        Mistake("a boolean as a word", sim(f, "encryption=maybe"), "true or false"),
        Mistake("an unknown task", sim(f, "task=translation"), "one of the tasks --help lists"),
        Mistake("an unknown partitioning", sim(f, "partitioning=random"), "iid or a listed one"),
        Mistake("client DP without encryption", sim(f, "dp=client"), "set encryption = true"),
        Mistake("--set without =", ["simulate", "--set", "num-rounds"], "--set KEY=VALUE", True),
        Mistake("a missing config file", ["simulate", "nofile.toml"], "check the path"),
        Mistake("a directory as config file", ["simulate", str(f["full"])], "give the TOML file"),
        Mistake(
            "a config file that is not TOML", ["simulate", str(f["not-toml.toml"])], "key = value"
        ),
        Mistake("a [table] in the config file", ["simulate", str(f["table.toml"])], "flat keys"),
        Mistake(
            "a config file that is not UTF-8",
            ["simulate", str(f["latin1.toml"])],
            "save it as UTF-8",
            True,
        ),
        Mistake(
            "an unreadable config file",
            ["simulate", str(f["locked.toml"])],
            "chmod a+r, or a copy",
            unreadable=True,
        ),
        Mistake("a missing model-path", sim(f, "model-path=/nonexistent"), "check the path"),
        Mistake("a missing data-path", sim(f, "data-path=/nonexistent.csv"), "check the path"),
        Mistake("a .txt data file", sim(f, f"data-path={f['notes.txt']}"), "a .csv or .jsonl"),
        Mistake("a wrong text-column", sim(f, "text-column=sentence"), "name a column it lists"),
        Mistake("a wrong label-column", sim(f, "label-column=y"), "name a column it lists"),
        Mistake(
            "an empty CSV", sim(f, f"data-path={f['empty.csv']}"), "add a header and rows", True
        ),
        Mistake(
            "a header-only CSV",
            sim(f, f"data-path={f['header.csv']}"),
            "add one row per example",
            True,
        ),
        Mistake(
            "a CSV with a broken quote", sim(f, f"data-path={f['quote.csv']}"), "fix the quoting"
        ),
        Mistake(
            "a semicolon-separated CSV",
            sim(f, f"data-path={f['semicolon.csv']}"),
            "comma-separated, or text-column/label-column",
        ),
        Mistake(
            "a broken JSONL file", sim(f, f"data-path={f['bad.jsonl']}"), "one object per line"
        ),
        Mistake("one label only", sim(f, f"data-path={f['one-label.csv']}"), "at least 2 labels"),
        Mistake(
            "an unreadable CSV",
            sim(f, f"data-path={f['locked.csv']}"),
            "chmod a+r, or a copy",
            unreadable=True,
        ),
        Mistake("more clients than examples", sim(f, "num-clients=100"), "fewer clients"),
        Mistake(
            "--run-dir is a file",
            ["simulate", "--run-dir", str(f["a-file"]), *base(f)],
            "a new directory",
        ),
        Mistake(
            "--run-dir is not empty",
            ["simulate", "--run-dir", str(f["full"]), *base(f)],
            "a new directory, or --resume",
        ),
        Mistake("device = cuda without CUDA", sim(f, "device=cuda"), "device = auto"),
        Mistake(
            "DP batch-size above a client's data", sim(f, *dp, "batch-size=500"), "a smaller batch"
        ),
        Mistake(
            "num-rounds the DP budget cannot afford",
            sim(f, *dp, "num-rounds=1000000000"),
            "fewer rounds",
        ),
        Mistake("max-examples below 0", sim(f, "max-examples=-1"), "0 (all) or more"),
        Mistake("zero local epochs", sim(f, "local-epochs=0"), "local-epochs >= 1"),
        Mistake("batch-size 0", sim(f, "batch-size=0"), "batch-size >= 1"),
        Mistake(
            "LoRA on modules the model lacks",
            sim(f, "lora-target-modules=q_proj"),
            "names in the model",
        ),
        Mistake(
            "--resume a directory that is no run",
            ["simulate", "--resume", str(f["not-a-run"])],
            "a run directory",
            True,
        ),
        Mistake(
            "--resume with --run-dir",
            ["simulate", "--resume", str(f["not-a-run"]), "--run-dir", "x"],
            "--resume RUN_DIR alone",
        ),
        Mistake(
            "--resume a finished run",
            ["simulate", "--resume", str(run)],
            "--set num-rounds=N",
            needs_run=True,
        ),
        Mistake(
            "--resume with another key",
            ["simulate", "--resume", str(run), "--set", "learning-rate=0.5"],
            "keep the run's config",
            needs_run=True,
        ),
        Mistake("evaluate a missing run", ["evaluate", "/nonexistent-run"], "a run directory"),
        Mistake(
            "evaluate a run with a corrupt metrics.jsonl",
            ["evaluate", str(run.parent / "corrupt")],
            "restore metrics.jsonl",
            needs_run=True,
            setup=lambda tmp: _corrupt_copy(run, tmp / "corrupt"),
        ),
        Mistake(
            "export a directory without checkpoint",
            ["export", str(f["not-a-run"])],
            "a run directory",
        ),
        Mistake("audit a missing run", ["audit", "/nonexistent-run"], "a run directory"),
        Mistake("audit a run without DP", ["audit", str(f["not-a-run"])], "a DP run's directory"),
        Mistake(
            "audit --json | head -1",
            ["audit", str(run), "--json"],
            "(none)",
            pipe="head -1",
            needs_run=True,
        ),
        Mistake(
            "simulate --help | head -1", ["simulate", "--help"], "(none)", True, pipe="head -1"
        ),
        Mistake("keygen into a file", ["keygen", "--out", str(f["a-file"])], "a directory"),
        # -- the config file and the command line
        Mistake(
            "a key misspelt in a TOML file",
            ["simulate", "--run-dir", "{run}", str(f["typo.toml"]), *base(f)],
            "spell the key as --help lists it",
            True,
        ),
        Mistake("a snake_case key", sim(f, "num_rounds=3"), "kebab-case: num-rounds", True),
        Mistake(
            "a TOML list for label-names",
            ["simulate", "--run-dir", "{run}", str(f["list.toml"]), *base(f)],
            'one string: label-names = "animal,food,tool"',
        ),
        Mistake(
            "a quoted word for a number (TOML)",
            ["simulate", "--run-dir", "{run}", str(f["quoted.toml"]), *base(f)],
            "learning-rate = 0.002",
        ),
        Mistake(
            "num-rounds = 1e9 in a TOML file, with DP",
            [
                "simulate",
                "--run-dir",
                "{run}",
                str(f["rounds-1e9.toml"]),
                *base(f, *dp, drop="num-rounds"),
            ],
            "fewer rounds",
        ),
        Mistake(
            "--set KEY = VALUE with spaces",
            ["simulate", "--set", "num-rounds", "=", "3"],
            "--set num-rounds=3",
            True,
        ),
        Mistake(
            "simulate --config FILE",
            ["simulate", "--config", str(f["typo.toml"])],
            "fedtune simulate FILE.toml",
            True,
        ),
        Mistake(
            "examples-per-label with data-path (--set)",
            sim(f, "examples-per-label=250"),
            "drop it; max-examples caps own data",
            True,
        ),
        Mistake(
            "examples-per-label with data-path (TOML file)",
            ["simulate", "--run-dir", "{run}", str(f["epl.toml"]), *base(f)],
            "drop it; max-examples caps own data",
        ),
        Mistake(
            "DP on own data without label-names",
            sim(f, "dp=example", "target-delta=1e-3"),
            "label-names = the labels, in order",
        ),
        Mistake(
            "label-names the data does not have",
            sim(f, "label-names=animal,food,plant"),
            "the data's labels",
        ),
        Mistake("fedtune version", ["version"], "fedtune --version"),
        # -- using a finished run
        Mistake(
            "export an encrypted run without --key",
            ["export", str(run), "--out", "{run}"],
            "--key RUN_DIR/keys/secret.ctx",
            needs_run=True,
        ),
        Mistake(
            "export with another run's key",
            ["export", str(run), "--key", str(run.parent / "other-keys" / "secret.ctx")],
            "the key the clients used",
            needs_run=True,
            setup=lambda tmp: _keygen(tmp / "other-keys"),
        ),
        Mistake(
            "evaluate after exporting an interrupted run",
            ["evaluate", str(run.parent / "interrupted")],
            "(none: it says the round was not evaluated)",
            needs_run=True,
            setup=lambda tmp: _interrupted_copy(run, tmp / "interrupted"),
            ok=r"reported no accuracy for round \d+, the adapter's round",
        ),
        Mistake(
            "generate on a classification run",
            ["generate", str(run), "--prompt", "Define dog."],
            "fedtune predict",
            needs_run=True,
        ),
        Mistake(
            "predict on a causal-LM run",
            ["predict", str(run.parent / "lm-run"), "--text", "a dog"],
            "fedtune generate",
            needs_run=True,
            setup=lambda tmp: _causal_lm_copy(run, tmp / "lm-run"),
        ),
        Mistake(
            "predict without --text or --data",
            ["predict", str(run)],
            "--text TEXT or --data FILE",
            needs_run=True,
        ),
        Mistake(
            "deploy supernode without its options",
            ["deploy", "supernode"],
            "the options --help lists",
        ),
        Mistake(
            "export --out is a file",
            ["export", str(run), "--out", str(f["a-file"])],
            "a directory",
            needs_run=True,
        ),
    ]


def _keygen(out: Path) -> None:
    """A key pair the run was not encrypted under."""
    from fedtune import crypto

    crypto.save_keys(crypto.make_secret_context(), out)


def _interrupted_copy(run: Path, out: Path) -> None:
    """The run as a stop before its last evaluation leaves it, its adapter exported."""
    shutil.copytree(run, out)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:-1]))


def _causal_lm_copy(run: Path, out: Path) -> None:
    """The run as if it had trained a causal LM (``predict`` reads the task from the config)."""
    shutil.copytree(run, out)
    config = out / "config.toml"
    text = re.sub(r'^task = ".*"$', 'task = "causal-lm"', config.read_text(), flags=re.M)
    config.write_text(text)


def _corrupt_copy(run: Path, out: Path) -> None:
    shutil.copytree(run, out)
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 2, "eval-acc')


# -- running and grading ----------------------------------------------------------------


def attempt(m: Mistake, tmp: Path, index: int, timeout: float) -> Outcome:
    if m.skip:
        return Outcome(m, "skipped", m.skip, 0.0)
    run_dir = tmp / f"run-{index}"
    argv = [a.replace("{run}", str(run_dir)) for a in m.argv]
    cmd = [sys.executable, "-m", "fedtune.cli", *argv]
    if m.unreadable and os.geteuid() == 0:  # root reads every file unless it drops the caps
        if not shutil.which("setpriv"):
            return Outcome(m, "skipped", "root reads every file, and setpriv is missing", 0.0)
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    start = time.perf_counter()
    if m.pipe:
        shell = " ".join(subprocess.list2cmdline([c]) for c in cmd) + f" | {m.pipe} >/dev/null"
        shell += "; exit ${PIPESTATUS[0]}"
        popen_args: list[str] = ["bash", "-c", shell]
    else:
        popen_args = cmd
    proc = subprocess.Popen(
        popen_args,
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Outcome(m, "silent", f"still running after {timeout:.0f} s", timeout)
    seconds = time.perf_counter() - start
    lines = [x for x in err.splitlines() if x.strip() and not NOISE.search(x)]
    text = "\n".join(lines)
    if "Traceback (most recent call last)" in text or re.search(r"^\w+Error: ", text, re.M):
        first = next((x for x in reversed(lines) if "Error" in x), lines[-1] if lines else "")
        return Outcome(m, "traceback", first.strip(), seconds, lines)
    if m.pipe:  # the mistake is the closed pipe: quiet is right, whatever the exit code
        return Outcome(
            m,
            "clean" if not lines else "noisy",
            "(nothing)" if not lines else lines[0],
            seconds,
            lines,
        )
    if m.ok and proc.returncode == 0:  # not an error: the answer must say what it means
        said = [x for x in out.splitlines() + lines if re.search(m.ok, x)]
        grade = "clean" if said else "silent"
        return Outcome(m, grade, said[0].strip() if said else "exit 0", seconds, lines)
    if proc.returncode == 0 or not lines:
        return Outcome(
            m,
            "silent",
            f"exit {proc.returncode}; {len(out.splitlines())} lines out",
            seconds,
            lines,
        )
    grade = "clean" if len(lines) <= MAX_LINES else "noisy"
    answer = next((x for x in lines if x.startswith(("fedtune", "usage"))), lines[0])
    if answer.startswith("usage") and len(lines) > 1:
        answer = lines[-1]
    return Outcome(m, grade, answer.strip(), seconds, lines)


def finished_run(files: dict[str, Path], tmp: Path) -> Path:
    """One tiny finished DP run, encrypted, for the mistakes made on a run directory."""
    run = tmp / "finished"
    dp = ("dp=example", "label-names=animal,food,tool", "target-delta=1e-3", "encryption=true")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune.cli",
            *[a.replace("{run}", str(run)) for a in sim(files, *dp)],
        ],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the tiny run failed: {proc.stderr[-2000:]}")
    return run


def markdown(outcomes: list[Outcome], tmp: Path) -> str:
    """The table of docs/troubleshooting.md (this run's temporary directory shown as ``…``)."""
    rows = ["| mistake | what fedtune prints | grade | fix |", "|---|---|---|---|"]
    for o in outcomes:
        line = o.line.replace(str(tmp), "…").replace("|", "\\|")
        if len(line) > 220:
            line = line[:219] + "…"
        rows.append(f"| {o.mistake.name} | `` {line} `` | {o.grade} | {o.mistake.fix} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the test suite's subset")
    parser.add_argument("--markdown", type=Path, help="write the table to this file")
    parser.add_argument("--jobs", type=int, default=2, help="mistakes tried at once")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per mistake")
    parser.add_argument("-k", dest="only", default="", help="only mistakes whose name has this")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtune-mistakes-") as name:
        tmp = Path(name)
        files = make_fixtures(tmp)
        chosen = [
            m
            for m in mistakes(files, tmp / "finished")
            if (m.fast or not args.fast) and args.only in m.name
        ]
        if any(m.needs_run for m in chosen):
            finished_run(files, tmp)
        for m in chosen:
            if m.setup is not None and not m.skip:
                m.setup(tmp)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            outcomes = list(
                pool.map(lambda im: attempt(im[1], tmp, im[0], args.timeout), enumerate(chosen))
            )
    for o in outcomes:
        print(f"{o.grade:9} {o.seconds:5.1f}s  {o.mistake.name}: {o.line}")
        if o.grade in ("traceback", "noisy"):
            for x in o.lines[-6:]:
                print(f"{'':17}| {x[:160]}")
    counts = {
        g: sum(o.grade == g for o in outcomes)
        for g in ("clean", "traceback", "noisy", "silent", "skipped")
    }
    print(
        f"{len(outcomes)} mistakes in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
    )
    if args.markdown:
        args.markdown.write_text(markdown(outcomes, tmp))
    return 0 if counts["traceback"] == counts["silent"] == counts["noisy"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
