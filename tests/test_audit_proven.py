"""``fedtune audit`` names the accountant whose ε decides each verdict.

A ledger of grid DP-SGD rounds (``mechanism = "discrete-gaussian"``) is decided by the
proven ``discrete-rdp`` ε, a float-noise ledger by PRV; the table, its footer, the JSON
and the HTML page all say which, and why.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import pytest

pytest.importorskip("opacus")

from fedtune.cli.audit import add_parser, run  # noqa: E402
from fedtune.privacy import PrivacyLedger, compute_epsilon  # noqa: E402
from fedtune.privacy.analysis import discrete_rdp_epsilon  # noqa: E402

DELTA = 1e-5
ROUNDS = 3
# q = 1, one step per round: each evaluation is fast (see test_audit_cli.py).
ROUND = dict(
    sample_rate=1.0,
    steps=1,
    max_grad_norm=1.0,
    delta=DELTA,
    accountant="prv",  # the ledger replaces it by the one proven for the mechanism
    relation="replace-one",
    level="example",
    noise="csprng",
    batch_size=10,
    local_epochs=1,
    num_examples=10,
)
SIGMAS = {"client-0": 8.0, "client-1": 6.0}
RO = {"relation": "replace-one"}
# client-0 under grid noise after 3 rounds: continuous PRV ε 1.708, proven discrete-rdp
# ε 1.847 (checked below), so a budget of 1.8 is met by PRV and overrun by discrete-rdp.
BETWEEN = 1.8


def _audit(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedtune")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(["audit", *argv]))


def _run_dir(root: Path, mechanisms: dict[str, str]) -> Path:
    for client, sigma in SIGMAS.items():
        ledger = PrivacyLedger(root / "privacy" / f"{client}.jsonl")
        for r in range(1, ROUNDS + 1):
            ledger.record(
                run_id="run-a",
                run_nonce="nonce-a",
                input_hash=f"input-{r}",
                round=r,
                client=client,
                noise_multiplier=sigma,
                timestamp=1000.0 + r,
                mechanism=mechanisms[client],
                **ROUND,  # type: ignore[arg-type]
            )
    return root


GRID = {c: "discrete-gaussian" for c in SIGMAS}
FLOAT = {c: "gaussian" for c in SIGMAS}
MIXED = {"client-0": "discrete-gaussian", "client-1": "gaussian"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("proven")
    return {
        name: _run_dir(root / name, mechanisms)
        for name, mechanisms in (("grid", GRID), ("float", FLOAT), ("mixed", MIXED))
    }


def test_golden_epsilons_put_the_budget_between_prv_and_discrete_rdp() -> None:
    history = [(SIGMAS["client-0"], 1.0, ROUNDS)]
    prv = compute_epsilon(history, delta=DELTA, accountant="prv", **RO)
    proven = discrete_rdp_epsilon(history, delta=DELTA, relation="replace-one")
    assert prv < BETWEEN < proven


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_grid_table_names_discrete_rdp_as_deciding(
    runs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    columns: int,
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert _audit(str(runs["grid"]), "--no-plot", "--budget", "5") == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    for client in SIGMAS:
        assert any(f"│ {client} " in line for line in lines)
    flat = " ".join(out.split())  # the footer wraps at the width
    assert "discrete-rdp ε decides the verdict: discrete Gaussian noise on a grid ran" in flat
    assert "PRV ε decides" not in flat
    if columns >= 100:  # the column is named after the accountant (squashed at 80)
        header = next(line for line in lines if "client" in line and "┃" in line)
        assert "discrete-rdp ε" in header and "PRV ε" not in header


def test_grid_wide_table_keeps_prv_and_rdp_beside_the_deciding_column(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert _audit(str(runs["grid"]), "--no-plot", "--wide") == 0
    out, _ = capsys.readouterr()
    header = next(line for line in out.splitlines() if "client" in line and "┃" in line)
    cols = [c.strip() for c in header.strip("┃").split("┃")]
    assert cols[-6:] == ["reported ε", "RDP ε", "PRV ε", "discrete-rdp ε", "budget", "verdict"]
    assert "the continuous-Gaussian PRV and RDP ε are for comparison only" in " ".join(out.split())


def test_float_table_names_prv_as_deciding(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert _audit(str(runs["float"]), "--no-plot") == 0
    out, _ = capsys.readouterr()
    flat = " ".join(out.split())
    assert "PRV ε decides the verdict: float Gaussian noise (PRV exact to ±0.01" in flat
    assert "discrete-rdp" not in out
    monkeypatch.delenv("COLUMNS")  # piped: --wide gets 160 columns
    assert _audit(str(runs["float"]), "--no-plot", "--wide") == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "┃ client" in line)
    cols = [c.strip() for c in header.strip("┃").split("┃")]
    assert cols[-5:] == ["reported ε", "RDP ε", "PRV ε", "budget", "verdict"]  # no duplicate


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_mixed_table_names_the_accountant_per_row(
    runs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    columns: int,
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert _audit(str(runs["mixed"]), "--no-plot") == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    row = {c: next(line for line in lines if f"│ {c} " in line) for c in SIGMAS}
    assert "│ discrete-rdp │" in row["client-0"] and "│ prv " in row["client-1"]
    flat = " ".join(out.split())
    assert "discrete-rdp ε decides for client-0 (example)" in flat
    assert "PRV ε decides for client-1 (example): float Gaussian noise" in flat


def test_json_has_the_deciding_epsilon_accountant_and_mechanisms(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _audit(str(runs["mixed"]), "--no-plot", "--json") == 0
    clients = {c["client"]: c for c in json.loads(capsys.readouterr().out)["clients"]}
    grid, flt = clients["client-0"], clients["client-1"]
    history = [(SIGMAS["client-0"], 1.0, ROUNDS)]
    assert (grid["accountant"], grid["mechanisms"]) == ("discrete-rdp", ["discrete-gaussian"])
    assert grid["epsilon_proven"] == pytest.approx(
        discrete_rdp_epsilon(history, delta=DELTA, relation="replace-one"), rel=1e-12
    )
    assert grid["epsilon_prv"] < grid["epsilon_proven"]  # the continuous figure
    assert (flt["accountant"], flt["mechanisms"]) == ("prv", ["gaussian"])
    assert flt["epsilon_proven"] == flt["epsilon_prv"]


def _page(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: float
) -> tuple[int, str]:
    page = tmp_path / "audit.html"
    code = _audit(str(run_dir), "--no-plot", "--report", str(page), "--budget", str(budget))
    capsys.readouterr()
    return code, html.unescape(page.read_text())


def test_grid_html_names_discrete_rdp_and_says_why_prv_does_not_decide(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # PRV ε 1.708 would fit a budget of 1.8; the proven discrete-rdp ε 1.847 does not.
    code, text = _page(runs["grid"], tmp_path, capsys, BETWEEN)
    assert code == 1 and "audit FAILED: 2 overrun of 2 clients" in text
    assert (
        "discrete-rdp ε decides for every client, whose ledgers compose discrete Gaussian "
        "noise on a grid (grid DP-SGD, the default, or client-level shares):" in text
    )
    assert "PRV ε decides" not in text and "because PRV decides" not in text
    assert (
        "client-0 (example): the continuous-Gaussian PRV ε 1.708 is within the budget 1.8, the "
        "proven discrete-rdp ε 1.847 is not: the verdict is 'overrun' because discrete-rdp "
        "decides" in text
    )
    # client-0's row: claimed, RDP, PRV, deciding ε and its accountant
    assert (
        '<td>1.847</td><td>1.850</td><td>1.708</td><td class="decides">1.847</td>'
        '<td class="l">discrete-rdp</td>' in text
    )


def test_float_html_names_prv_and_keeps_the_rdp_note(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # client-0's RDP ε 1.850 is above 1.8, its PRV ε 1.708 is not: ok, PRV decides.
    code, text = _page(runs["float"], tmp_path, capsys, BETWEEN)
    assert code == 1  # client-1 (PRV ε 2.352) overruns
    assert (
        "PRV ε decides for every client, whose ledgers compose float Gaussian noise "
        '(dp-noise = "float", DP evaluations):' in text
    )
    assert "discrete-rdp ε decides" not in text and "decided by" in text
    assert "client-0 (example): RDP ε 1.850 is above the budget 1.8, PRV ε 1.708 is not" in text
    assert '<td class="decides">1.708</td><td class="l">prv</td>' in text


def test_mixed_html_names_each_accountant_and_compares_rdp_only_for_float(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # budget 2.4: client-1 (float) has RDP ε 2.547 above it, PRV ε 2.352 below: a note.
    # client-0 (grid) has RDP ε 1.850 and discrete-rdp ε 1.847: nothing to note.
    code, text = _page(runs["mixed"], tmp_path, capsys, 2.4)
    assert code == 0
    assert "discrete-rdp ε decides for client-0 (example), whose ledgers compose discrete" in text
    assert "PRV ε decides for client-1 (example), whose ledgers compose float" in text
    notes = [line for line in text.split('<p class="note">')[1:] if "decides." in line]
    assert len(notes) == 1 and notes[0].startswith("client-1 (example): RDP ε 2.547")
