"""``fedtune audit``: ledger discovery, verdicts, exit codes, JSON, budget from config, plot."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opacus")

from fedtune.cli.audit import add_parser, run  # noqa: E402
from fedtune.privacy import PrivacyLedger, compute_epsilon  # noqa: E402

DELTA = 1e-5
# q = 1 (no subsampling) keeps each PRV evaluation at ~20 ms; a subsampled history
# takes ~0.5 s, which over every record of every test would blow the time budget.
# (a full batch of 10 of 10 examples, one epoch: the q = 1 / steps = 1 the records claim)
ROUND = dict(
    sample_rate=1.0,
    steps=1,
    max_grad_norm=1.0,
    delta=DELTA,
    accountant="prv",
    relation="replace-one",
    level="example",
    noise="csprng",
    batch_size=10,
    local_epochs=1,
    num_examples=10,
)
RO = {"relation": "replace-one"}
SIGMAS = {"client-0": 8.0, "client-1": 6.0}
ROUNDS = 3
# Replace-one PRV ε after 3 rounds (q = 1: sensitivity 2): σ=8 -> 1.708, σ=6 -> 2.352
# (compute_epsilon, checked below), so a budget of 2.0 is overrun by client-1 only.
SPLIT_BUDGET = 2.0


def _audit(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedtune")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(["audit", *argv]))


def _write_ledgers(folder: Path) -> None:
    for client, sigma in SIGMAS.items():
        ledger = PrivacyLedger(folder / f"{client}.jsonl")
        for r in range(1, ROUNDS + 1):
            ledger.record(
                run_id="run-a",
                run_nonce="nonce-a",
                input_hash=f"input-{r}",
                round=r,
                client=client,
                noise_multiplier=sigma,
                timestamp=1000.0 + r,
                **ROUND,
            )


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as `fedtune simulate` writes it, without config.toml."""
    root = tmp_path_factory.mktemp("clean") / "run"
    _write_ledgers(root / "privacy")
    (root / "metrics.jsonl").write_text('{"round": 0, "eval-accuracy": 0.5}\n')
    return root


@pytest.fixture
def run_dir(clean_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_run, tmp_path / "run"))


def _json_report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """Exit code, parsed stdout and stderr of ``fedtune audit --json --no-plot ARGV``."""
    code = _audit(*argv, "--json", "--no-plot")
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_golden_epsilons_split_the_budget() -> None:
    eps = {
        c: compute_epsilon([(s, 1.0, ROUNDS)], delta=DELTA, accountant="prv", **RO)
        for c, s in SIGMAS.items()
    }
    assert eps["client-0"] < SPLIT_BUDGET < eps["client-1"]


def test_clean_run_exits_0_and_lists_every_client(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _audit(str(run_dir), "--no-plot") == 0
    out, err = capsys.readouterr()
    for client in SIGMAS:
        assert client in out
    assert "reported ε" in out and "PRV ε" in out
    assert "audit ok: all 2 clients ok" in out
    assert "budget NOT checked" in out  # no --budget, no config.toml: said, not hidden
    # No --delta, no policy.toml: the default node δ, said, never a record's own.
    assert "δ=1e-05 from the default node δ" in out
    assert "replace-one" in out and "csprng" in out
    assert err == ""  # metrics.jsonl was not taken for a ledger


def test_tampered_epsilon_exits_1_and_names_the_client(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_dir / "privacy" / "client-1.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    honest = record["epsilon"]
    record["epsilon"] = honest / 2
    lines[1] = json.dumps(record, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")

    assert _audit(str(run_dir), "--no-plot") == 1
    out, err = capsys.readouterr()
    assert "under-reported" in out
    assert "audit FAILED: 1 under-reported of 2 clients" in out
    expected = (
        f"client 'client-1' (example-level) under-reported: run 'run-a' round 2: "
        f"reported ε={honest / 2:.6g} but PRV recomputes {honest:.6g}"
    )
    assert expected in err
    assert "client-0" not in err


def test_budget_overrun_exits_1_and_names_the_client(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _audit(str(run_dir), "--budget", str(SPLIT_BUDGET), "--no-plot") == 1
    out, err = capsys.readouterr()
    assert "audit FAILED: 1 overrun of 2 clients" in out
    assert "budget ε=2 from --budget" in out
    assert (
        "client 'client-1' (example-level) overrun: budget ε=2 exceeded: recomputed PRV ε=2.35"
        in err
    )
    assert "client-0" not in err


def test_json_report_has_verdicts_and_recomputed_epsilons(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = _json_report(capsys, str(run_dir), "--budget", str(SPLIT_BUDGET))
    assert code == 1
    assert report["ok"] is False
    assert report["budget_epsilon"] == SPLIT_BUDGET
    assert report["budget_source"] == "--budget"
    clients = {c["client"]: c for c in report["clients"]}
    assert {c: v["verdict"] for c, v in clients.items()} == {
        "client-0": "ok",
        "client-1": "overrun",
    }
    for client, sigma in SIGMAS.items():
        c = clients[client]
        history = [(sigma, 1.0, ROUNDS)]
        assert c["epsilon_prv"] == pytest.approx(
            compute_epsilon(history, delta=DELTA, accountant="prv", **RO)
        )
        assert c["epsilon_rdp"] == pytest.approx(
            compute_epsilon(history, delta=DELTA, accountant="rdp", **RO)
        )
        assert c["epsilon_rdp"] >= c["epsilon_prv"]  # RDP is the looser bound
        assert (c["rounds"], c["total_steps"], c["noise_multipliers"]) == (ROUNDS, ROUNDS, [sigma])
        assert c["ledger"] == str(run_dir / "privacy" / f"{client}.jsonl")


@pytest.mark.parametrize(
    ("config", "code", "source"),
    [
        ("target-epsilon = 2.0\nepsilon-budget = 0.0\n", 1, "target-epsilon (epsilon-budget = 0)"),
        ("target-epsilon = 2.0\n", 1, "target-epsilon in"),
        ("target-epsilon = 2.0\nepsilon-budget = 5.0\n", 0, "epsilon-budget in"),
        ("epsilon-budget = 2.0\n", 1, "epsilon-budget in"),
    ],
)
def test_budget_is_read_from_config_toml(
    run_dir: Path, capsys: pytest.CaptureFixture[str], config: str, code: int, source: str
) -> None:
    (run_dir / "config.toml").write_text('model-path = ""\n' + config)
    got, report, _ = _json_report(capsys, str(run_dir))
    assert got == code
    assert source in report["budget_source"]
    assert report["budget_epsilon"] in (2.0, 5.0)


def test_budget_flag_overrides_config_toml(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "config.toml").write_text("target-epsilon = 2.0\n")
    code, report, _ = _json_report(capsys, str(run_dir), "--budget", "10")
    assert (code, report["budget_epsilon"], report["budget_source"]) == (0, 10.0, "--budget")


def test_config_without_budget_keys_skips_the_check_and_says_so(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "config.toml").write_text("num-rounds = 3\n")
    code, report, _ = _json_report(capsys, str(run_dir))
    assert (code, report["budget_epsilon"]) == (0, None)
    assert report["budget_source"].startswith("none: no --budget and no target-epsilon")


def test_invalid_budget_in_config_exits_2_naming_the_file(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "config.toml").write_text("target-epsilon = -1.0\n")
    assert _audit(str(run_dir), "--no-plot") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune audit: error: ")
    assert f"{str(run_dir / 'config.toml')!r}: `target-epsilon` must be > 0" in err


def test_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert _audit(str(missing)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"fedtune audit: error: {str(missing)!r} does not exist; expected a run directory, "
        "a node's state directory or a .jsonl privacy ledger.\n"
    )


def test_directory_without_ledgers_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "privacy").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')  # not a ledger
    assert _audit(str(tmp_path)) == 2
    assert f"fedtune audit: error: no privacy ledgers in {str(tmp_path)!r}" in (
        capsys.readouterr().err
    )


def test_empty_ledger_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / "c0.jsonl").write_text("")
    assert _audit(str(tmp_path)) == 2
    assert "fedtune audit: error: no ledger records in" in capsys.readouterr().err


def test_corrupt_ledger_exits_2_naming_the_file_and_line(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_dir / "privacy" / "client-0.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    assert _audit(str(run_dir)) == 2
    err = capsys.readouterr().err
    assert f"fedtune audit: error: privacy ledger {path}: line 1 is not a valid record" in err


def test_non_ledger_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("target-epsilon = 1.0\n")
    assert _audit(str(config)) == 2
    assert f"{str(config)!r} is not a .jsonl privacy ledger" in capsys.readouterr().err


def test_torn_last_line_is_a_warning_not_an_error(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_dir / "privacy" / "client-0.jsonl"
    path.write_text(path.read_text() + '{"run_id": "run-a", "rou')
    code, report, err = _json_report(capsys, str(run_dir))
    assert code == 0
    assert report["clients"][0]["rounds"] == ROUNDS
    assert any("torn last line" in w for w in report["warnings"])
    assert f"fedtune audit: warning: ignoring a torn last line in privacy ledger {path}" in err


def test_node_state_dir_and_single_file(
    clean_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "node"
    state.mkdir()
    shutil.copy(clean_run / "privacy" / "client-1.jsonl", state / "ledger.jsonl")
    code, report, _ = _json_report(capsys, str(state), "--budget", str(SPLIT_BUDGET))
    assert code == 1
    assert [c["client"] for c in report["clients"]] == ["client-1"]
    assert report["ledgers"] == [str(state / "ledger.jsonl")]

    code, report, _ = _json_report(capsys, str(state / "ledger.jsonl"))
    assert (code, report["budget_epsilon"]) == (0, None)
    assert "single ledger file" in report["budget_source"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "0"], "argument --budget: expected a finite ε > 0, got '0'"),
        (["--budget", "inf"], "argument --budget: expected a finite ε > 0, got 'inf'"),
        (["--tolerance", "-1"], "argument --tolerance: expected a finite tolerance >= 0"),
        (["--plot", "a.png", "--no-plot"], "not allowed with argument"),
    ],
)
def test_bad_flag_values_exit_2(
    run_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit, match="2"):
        _audit(str(run_dir), *argv)
    assert message in capsys.readouterr().err


def test_plot_is_written_next_to_the_ledgers(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _audit(str(run_dir), "--budget", "3") == 0
    default = run_dir / "privacy" / "epsilon.png"
    assert f"plot {default}" in capsys.readouterr().out
    assert default.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    chosen = tmp_path / "figs" / "eps.png"
    _, report, _ = _json_report(capsys, str(run_dir / "privacy" / "client-0.jsonl"))
    assert report["plot"] is None  # a single file has no default plot location
    assert _audit(str(run_dir), "--plot", str(chosen), "--json") == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(chosen)
    assert chosen.stat().st_size > 10_000


def test_client_in_several_ledgers_is_audited_per_file_with_a_warning(
    clean_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        shutil.copy(clean_run / "privacy" / "client-0.jsonl", tmp_path / name)
    code, report, err = _json_report(capsys, str(tmp_path))
    # composed across both files client-0 would look under-reported; per file it is honest
    assert code == 0
    assert [c["verdict"] for c in report["clients"]] == ["ok", "ok"]
    assert "client 'client-0' (example-level) appears in 2 ledgers (a.jsonl, b.jsonl)" in err


def test_delta_comes_from_config_toml_and_records_at_another_delta_fail(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "config.toml").write_text("target-delta = 1e-5\ntarget-epsilon = 8.0\n")
    code, report, _ = _json_report(capsys, str(run_dir))
    assert (code, report["delta"]) == (0, DELTA) and "target-delta in" in report["delta_source"]
    # the run promised δ = 1e-7: every record (written at 1e-5) is flagged, and ε is
    # recomputed at 1e-7 (larger than what the records state)
    code, report, err = _json_report(capsys, str(run_dir), "--delta", "1e-7")
    assert code == 1 and report["delta_source"] == "--delta"
    assert {c["verdict"] for c in report["clients"]} == {"inconsistent"}
    assert "recorded at δ=1e-05, not the audit δ=1e-07" in err
    for c in report["clients"]:
        assert c["epsilon_prv"] > c["reported_epsilon"]


def test_records_that_disagree_with_the_run_config_fail(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "config.toml").write_text("target-delta = 1e-5\nbatch-size = 64\n")
    code, report, err = _json_report(capsys, str(run_dir))
    assert code == 1 and {c["verdict"] for c in report["clients"]} == {"inconsistent"}
    assert "batch_size=10, the run config says 64" in err


@pytest.mark.parametrize("value", ["0", "1", "x"])
def test_bad_delta_flag_exits_2(
    run_dir: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit, match="2"):
        _audit(str(run_dir), "--delta", value)
    assert f"argument --delta: expected a δ in (0, 1), got {value!r}" in capsys.readouterr().err


def test_html_report_is_one_self_contained_page(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "out" / "audit.html"
    assert _audit(str(run_dir), "--no-plot", "--report", str(page), "--budget", "2.0") == 1
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for client in SIGMAS:
        assert f'<td class="l">{client}</td>' in text
    assert "audit FAILED: 1 overrun of 2 clients" in text
    assert "replace-one" in text and "What ε does not cover" in text
    assert "Held-out evaluation metrics" in text
    assert 'src="data:image/png;base64,' in text  # the plot is embedded, even with --no-plot
    assert "<script" not in text and "http" not in text.replace("https://", "")  # offline
    assert f"report {page}" in capsys.readouterr().err


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_table_fits_the_terminal_and_names_every_client(
    run_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    columns: int,
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert _audit(str(run_dir), "--no-plot", "--budget", "5") == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    for client in SIGMAS:  # whole names, not "clie…"
        assert any(f"│ {client} " in line for line in lines)
    assert "PRV ε decides the verdict" in out


def test_piped_table_fits_100_columns_and_wide_shows_the_rest(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert _audit(str(run_dir), "--no-plot") == 0
    narrow, _ = capsys.readouterr()
    assert max(len(line) for line in narrow.splitlines()) <= 100
    assert "RDP ε" not in narrow.split("\n└")[0]  # not a column of the narrow table
    assert _audit(str(run_dir), "--no-plot", "--wide") == 0
    wide, _ = capsys.readouterr()
    header = next(line for line in wide.splitlines() if "client" in line and "┃" in line)
    for col in ("relation", "noise", "q", "δ", "RDP ε", "PRV ε"):
        assert col in header


def test_html_report_has_provenance_and_names_the_deciding_accountant(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune.cli.audit_provenance import fedtune_version

    (run_dir / "config.toml").write_text(
        'model-path = ""\nnum-clients = 2\nnum-rounds = 3\ndp = "example"\n'
        "target-epsilon = 2.0\ntarget-delta = 1e-5\n"
    )
    page = tmp_path / "audit.html"
    # budget 2.4: client-1's RDP ε 2.547 is above it, its PRV ε 2.352 is not
    assert _audit(str(run_dir), "--no-plot", "--report", str(page), "--budget", "2.4") == 0
    text = page.read_text()
    for row in ("report written", "fedtune version", "run id", "run settings", "budget", "δ"):
        assert f'<th class="l">{row}</th>' in text
    assert f'<td class="l">{fedtune_version()}</td>' in text
    assert '<td class="l">run-a</td>' in text
    assert "ε = 2.4, from --budget" in text
    assert "1e-05, from target-delta in" in text
    assert "classification · all-MiniLM-L6-v2 · 2 clients · 3 rounds · dp example" in text
    assert "PRV ε decides for every client, whose ledgers compose float Gaussian noise" in text
    for head in ("RDP ε", "PRV ε", "deciding ε", "decided by"):
        assert f"<th>{head}</th>" in text or f'<th class="l">{head}</th>' in text
    assert '<td class="l">prv</td>' in text
    assert (
        "client-1 (example): RDP ε 2.547 is above the budget 2.4, PRV ε 2.352 is not: "
        "the verdict is &#x27;ok&#x27; because PRV decides." in text
    )
    for head in ("n_k", "clip C", "batch", "epochs"):
        assert f"<th>{head}</th>" in text
    # client-0's row: n_k 10, C 1.0, batch 10, 1 epoch, from its ledger
    assert '<td class="l">csprng</td><td>10</td><td>1.000</td><td>10</td><td>1</td>' in text
    capsys.readouterr()


def test_plot_draws_identical_clients_once_with_their_names() -> None:
    from fedtune.cli.audit_plot import group_identical

    same = [1.0, 2.0, 3.0]
    series = [(f"client-{k} (example)", [1.0, 2.0, 3.0], list(same)) for k in range(4)]
    series.append(("client-4 (example)", [1.0, 2.0, 3.0], [1.0, 2.5, 3.5]))
    groups = group_identical(series)
    assert [len(labels) for labels, _, _ in groups] == [4, 1]
    assert groups[0][0] == [f"client-{k} (example)" for k in range(4)]
