"""The adapter travels, and a classification run serves new data.

``fedtune export``: ``base_model_name_or_path`` is a name ``from_pretrained`` finds
elsewhere, ``README.md`` is a model card with (ε, δ) per client, ``id2label`` holds the
label names, the printed snippet loads it with stock PEFT without a MISSING report;
a missing or wrong key is named with the fix. ``fedtune evaluate --data`` scores a
separate labelled file, ``fedtune predict`` labels new text, and ``evaluate`` compares an
adapter with the metrics of its own round.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from fedtune.apps.cli import main
from fedtune.config import RunConfig, load_toml, parse_run_config
from fedtune.model import build_model, get_adapter_vector
from fedtune.privacy import PrivacyLedger
from fedtune.run.card import BUNDLED_HUB_IDS, base_model_name, run_settings
from fedtune.run.checkpoint import Checkpoint, save_checkpoint
from fedtune.secure import run_codec

LABELS = ["animal", "food", "tool"]  # the labels of conftest.WORDS


def _config(tiny_model_dir: Path, toy_csv: Path, **extra: object) -> dict[str, object]:
    flat: dict[str, object] = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "label-names": ",".join(LABELS),
        "num-clients": 2,
        "num-rounds": 2,
        "max-seq-length": 16,
    }
    flat.update(extra)
    return flat


def _write_toml(path: Path, flat: dict[str, object]) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in flat.items()]
    path.write_text("\n".join(lines) + "\n")


def _ledgers(run_dir: Path) -> list[float]:
    """One full-batch release per client (σ = 4 and 6); their ε as the ledger computed it."""
    eps = []
    for k, sigma in enumerate((4.0, 6.0)):
        rec = PrivacyLedger(run_dir / "privacy" / f"client-{k}.jsonl").record(
            run_id="run-x",
            run_nonce="n",
            input_hash="h",
            round=2,
            client=f"client-{k}",
            noise_multiplier=sigma,
            sample_rate=1.0,
            steps=1,
            max_grad_norm=1.0,
            delta=1e-5,
            accountant="prv",
            relation="replace-one",
            level="example",
            noise="csprng",
            timestamp=1.0,
            num_examples=48,
            batch_size=48,
            local_epochs=1,
        )
        eps.append(rec.epsilon)
    return eps


def _run_dir(root: Path, flat: dict[str, object], *, secret: Path | None = None) -> Path:
    """A run directory with config.toml, a round-2 checkpoint and two ledgers."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_toml(run_dir / "config.toml", flat)
    cfg = parse_run_config(load_toml(run_dir / "config.toml"))
    vector = get_adapter_vector(build_model(cfg.model, num_labels=len(LABELS), seed=3))
    codec = run_codec("ckks", length=vector.size, context=secret)
    save_checkpoint(
        run_dir / "checkpoint",
        Checkpoint(round=2, payload=codec.encode(vector * 10.0), num_examples=10),
    )
    (run_dir / "epsilons.json").write_text(json.dumps(_ledgers(run_dir)))
    return run_dir


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, toy_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = _run_dir(tmp_path_factory.mktemp("plain"), _config(tiny_model_dir, toy_csv))
    assert main(["export", str(run_dir), "--base-model", str(tiny_model_dir)]) == 0
    return run_dir


def test_bundled_model_is_named_by_its_hub_id() -> None:
    assert base_model_name(RunConfig()) == "sentence-transformers/all-MiniLM-L6-v2"
    assert BUNDLED_HUB_IDS["causal-lm"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    own = parse_run_config({"model-path": "~/models/my-bert"})
    assert base_model_name(own) == "~/models/my-bert"  # as the user wrote it
    assert run_settings(RunConfig()) == (
        "classification · all-MiniLM-L6-v2 · 4 clients · 5 rounds · no DP · plain"
    )


def test_export_writes_name_card_and_labels(
    exported: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = exported / "adapter"
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(tiny_model_dir)
    card = (adapter / "README.md").read_text()
    assert "More Information Needed" not in card
    assert f"base_model: {tiny_model_dir}" in card
    eps = json.loads((exported / "epsilons.json").read_text())
    assert f"| client-0 | example | 48 | {eps[0]:.3f} | 1e-05 |" in card
    assert f"| client-1 | example | 48 | {eps[1]:.3f} | 1e-05 |" in card
    assert "replace-one" in card and "2 clients, 2 rounds" in card
    assert "labels: animal, food, tool" in card
    assert "the clients' own file `toy.csv`" in card
    assert json.loads((adapter / "fedtune.json").read_text())["label-names"] == LABELS


def test_printed_snippet_loads_with_stock_peft_without_missing(
    exported: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from fedtune.run.card import loading_snippet

    cfg = parse_run_config(load_toml(exported / "config.toml"))
    meta = json.loads((exported / "adapter" / "fedtune.json").read_text())
    snippet = loading_snippet(
        str(exported / "adapter"), cfg, meta["label-names"], base_model=meta["base-model"]
    )
    capfd.readouterr()
    scope: dict[str, object] = {}
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(snippet, "snippet", "exec"), scope)  # noqa: S102 - the text we print
    finally:  # the snippet quiets transformers for the whole process: restore it
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    out, err = capfd.readouterr()
    assert "MISSING" not in out + err and "UNEXPECTED" not in out + err
    assert "Loading weights" not in err  # no progress bar either
    assert [str(w.message) for w in caught] == []
    model = scope["model"]
    assert model.config.id2label == dict(enumerate(LABELS))  # type: ignore[attr-defined]
    # the trained head came from the adapter, not the base's fresh one
    from fedtune.run.own_data import predict_texts

    ours = predict_texts(exported, ["a cat that is big"])[0]
    tok = scope["tokenizer"](["a cat that is big"], return_tensors="pt")  # type: ignore[operator]
    logits = model(**tok).logits  # type: ignore[operator]
    assert LABELS[int(logits.argmax())] == ours.label


def test_predict_labels_text_and_files(
    exported: Path, toy_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(exported), "--text", "a cat", "--text", "a rice", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["a cat", "a rice"]
    assert all(r["label"] in LABELS and 0 < r["probability"] <= 1 for r in rows)
    assert main(["predict", str(exported), "--data", str(toy_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 120 and lines[0].split("\t")[0] in LABELS


def test_evaluate_scores_a_separate_file(
    exported: Path, toy_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(exported), "--data", str(toy_csv), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["eval-examples"] == 120
    assert 0.0 <= scored["eval-accuracy"] <= 1.0
    assert scored["labels"] == {name: 40 for name in LABELS}

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\na cat,animal\na rose,plant\n")
    assert main(["evaluate", str(exported), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "has labels ['plant'] the adapter was not trained on" in err
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for path, says in ((header_only, "has a header but no rows"), (empty, "is empty")):
        assert main(["evaluate", str(exported), "--data", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err


def test_evaluate_compares_the_adapter_with_its_own_round(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(exported, tmp_path / "run"))
    # interrupted: metrics end at round 1, the checkpoint (and adapter) are round 2
    (run / "metrics.jsonl").write_text(
        '{"round": 0, "eval-accuracy": 0.3}\n{"round": 1, "eval-accuracy": 0.125}\n'
    )
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "for round 1" not in out
    assert "the run reported no accuracy for round 2" in out


def test_export_without_key_points_to_the_runs_own_key(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune import crypto

    keys = crypto.save_keys(crypto.make_secret_context(), tmp_path / "run" / "keys")
    other = crypto.save_keys(crypto.make_secret_context(), tmp_path / "other")
    flat = _config(tiny_model_dir, toy_csv, encryption=True)
    run_dir = _run_dir(tmp_path, flat, secret=keys.secret)
    assert main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"pass --key {run_dir / 'keys' / 'secret.ctx'}" in err
    assert main(["export", str(run_dir), "--key", str(other.secret)]) == 2
    err = capsys.readouterr().err
    mine = other.fingerprint.read_text().strip()[:24]
    theirs = keys.fingerprint.read_text().strip()[:24]
    assert f"--key {str(other.secret)!r} (fingerprint {mine!r}) is not the key" in err
    assert f"was encrypted under (fingerprint {theirs!r})" in err
    assert main(["export", str(run_dir), "--key", str(keys.secret)]) == 0


def test_examples_per_label_is_refused_with_own_data() -> None:
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="`examples-per-label` applies to the bundled WordNet"):
        parse_run_config({"data-path": "mine.csv", "examples-per-label": 100})
    for value in (0, 250):  # "all" and the default say nothing about own data: accepted
        parse_run_config({"data-path": "mine.csv", "examples-per-label": value})
    assert parse_run_config({"examples-per-label": 100}).data.examples_per_label == 100


def test_metrics_plot_carries_the_run_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from fedtune.run.metrics import plot_metrics

    titles: list[str] = []
    panels: list[list[str]] = []
    save = Figure.savefig

    def spy(self: Figure, *args: object, **kwargs: object) -> None:
        titles.append(self.get_suptitle())
        panels.append([ax.get_title() for ax in self.axes])
        save(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Figure, "savefig", spy)
    cfg = parse_run_config({"dp": "example", "encryption": True, "num-rounds": 3})
    records = [{"round": 0, "eval-accuracy": 0.1}, {"round": 1, "eval-accuracy": 0.5}]
    plot_metrics(records, tmp_path / "metrics.png", settings=run_settings(cfg))
    assert titles == [
        "classification · all-MiniLM-L6-v2 · 4 clients · 3 rounds · "
        "dp example (target ε=8, δ=1e-05) · CKKS encrypted"
    ]
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    assert panels[0][:2] == ["held-out accuracy", "loss"]
    # held-out metrics released under DP say so on their panels
    plot_metrics(records, tmp_path / "dp.png", settings=run_settings(cfg), noisy_eval=True)
    assert [t.splitlines()[-1] for t in panels[1][:2]] == ["(DP releases: noisy)"] * 2
    floating = parse_run_config({"dp": "example", "dp-noise": "float"})
    assert "δ=1e-05, float noise)" in run_settings(floating)
    # client-level shares are always on the grid, whatever dp-noise says
    client = parse_run_config({"dp": "client", "encryption": True, "dp-noise": "float"})
    assert "float noise" not in run_settings(client)
    # the panels' flag: DP releases only where DP is on and evaluation = "dp"
    flags = {
        (dp, evaluation): parse_run_config({"dp": dp, "evaluation": evaluation}).privacy
        for dp in ("off", "example")
        for evaluation in ("dp", "exact")
    }
    assert {key: p.dp_evaluation for key, p in flags.items()} == {
        ("off", "dp"): False,
        ("off", "exact"): False,
        ("example", "dp"): True,
        ("example", "exact"): False,
    }
