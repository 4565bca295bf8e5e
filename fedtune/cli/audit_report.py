"""``fedtune audit PATH --report FILE.html``: one self-contained page for an auditor.

Everything ``fedtune audit`` prints, for someone who does not use a terminal: the
verdict, one row per client (the ledger's claim, the continuous-Gaussian PRV and RDP
recomputations, the deciding ε and the accountant proven for the noise that ran, the
budget, the empirical lower bound of a canary run), the ε-per-round plot embedded as a PNG,
the neighbouring relation the ledgers declare and what the ε does not cover. No
scripts, no external files or fonts: the page opens the same offline.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.privacy.audit import AuditReport

if TYPE_CHECKING:
    from fedtune.cli.audit_provenance import ClientFacts, Provenance

__all__ = ["write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 80em;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { white-space: nowrap; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.45em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.ok { color: #11772d; font-weight: bold; } .bad { color: #b00020; font-weight: bold; }
td.decides { font-weight: bold; }
.note { color: #555; font-size: 0.9em; } table.prov td { max-width: 60em; white-space: normal; }
img { max-width: 100%; border: 1px solid #ddd; }
"""

#: Columns of the client table whose text is left-aligned.
_LEFT = ("client", "level", "noise", "decided by")

_EVAL_PLAIN = (
    "Held-out evaluation metrics (eval-loss, eval-accuracy, their example counts) are sent "
    "in plaintext and are not covered by ε."
)
_EVAL_DP = (
    "Held-out evaluation metrics were Gaussian releases (ledger records of kind 'eval') and "
    "are counted in ε; the held-out example count is public. Records of kind 'eval-exact' "
    "(a node's own opt-out) are exact metrics, not covered by ε."
)

_NOT_COVERED = (
    "Each client's example count n_k is public (it is the FedAvg weight): that is why ε is "
    "stated under the replace-one relation, whose neighbouring data sets have the same size.",
    "The ε bounds what the releases reveal about one example (example level) or one client "
    "(client level) of the client that kept the ledger, assuming the server and the other "
    "clients see everything that client released; it says nothing about other parties' data.",
    "An empirical lower bound comes from one run's canaries: it can refute a claimed ε, never "
    "confirm one, and is loose by design.",
    "Records marked 'seeded' drew their noise from a seed: not for real data.",
)


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}f}"
    if value is None:
        return "—"
    return str(value)


def _cell(value: object, *, left: bool = False, css: str = "") -> str:
    classes = " ".join(c for c in ("l" if left else "", css) if c)
    attr = f' class="{classes}"' if classes else ""
    return f"<td{attr}>{html.escape(_fmt(value))}</td>"


def write_report(
    path: Path,
    *,
    source: Path,
    report: AuditReport | None,
    empirical: Mapping[str, Mapping[str, object]],
    plot_png: bytes | None,
    summary: str,
    notes: Sequence[str] = (),
    provenance: Provenance | None = None,
    client_facts: Mapping[tuple[str, str], ClientFacts] | None = None,
    dp_evaluation: bool = False,
) -> None:
    """Write the page to ``path`` (a :class:`ConfigError` names it if it cannot).

    ``provenance``: the run, version, dates, budget and δ sources and the deciding
    accountant (:func:`fedtune.cli.audit_provenance.provenance`); ``client_facts``: each
    client's n_k, clip norm, batch size and epochs from its ledger; ``dp_evaluation``:
    the ledgers hold DP evaluation releases (kind ``eval``), so held-out metrics are in ε.
    """
    rows = []
    facts = client_facts or {}
    clients = report.clients if report is not None else ()
    relations = sorted({c.relation for c in clients}) or ["none (no DP ledger)"]
    for c in clients:
        e = empirical.get(c.client) if c.level == "example" else None
        verdict_css = "ok" if c.verdict == "ok" else "bad"
        rows.append(
            "<tr>"
            + _cell(c.client, left=True)
            + _cell(c.level, left=True)
            + _cell(c.noise, left=True, css="" if c.noise == "csprng" else "bad")
            + _cell(getattr(facts.get((c.client, c.level)), "num_examples", None))
            + _cell(getattr(facts.get((c.client, c.level)), "max_grad_norm", None))
            + _cell(getattr(facts.get((c.client, c.level)), "batch_size", None))
            + _cell(getattr(facts.get((c.client, c.level)), "local_epochs", None))
            + _cell(c.rounds)
            + _cell(c.total_steps)
            + _cell(", ".join(f"{s:.4g}" for s in c.noise_multipliers))
            + _cell(", ".join(f"{q:.4g}" for q in c.sample_rates))
            + _cell(f"{c.delta:g}")
            + _cell(c.reported_epsilon)
            + _cell(c.epsilon_rdp)
            + _cell(c.epsilon_prv)
            + _cell(c.epsilon_proven, css="decides")
            + _cell(c.accountant, left=True)
            + _cell(c.budget_epsilon)
            + (
                _cell(None if e is None else float(e["epsilon-lower-bound"]))  # type: ignore[arg-type]
                if empirical
                else ""
            )
            + _cell(c.verdict, left=True, css=verdict_css)
            + "</tr>"
        )
    client_table = (
        "<table><tr>"
        + "".join(
            f'<th class="l">{h}</th>' if h in _LEFT else f"<th>{h}</th>"
            for h in (
                "client",
                "level",
                "noise",
                "n_k",
                "clip C",
                "batch",
                "epochs",
                "rounds",
                "steps",
                "σ",
                "q",
                "δ",
                "claimed ε",
                "RDP ε",
                "PRV ε",
                "deciding ε",
                "decided by",
                "budget",
                *(("empirical ε ≥",) if empirical else ()),
                "verdict",
            )
        )
        + "</tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else '<p class="note">No privacy ledger: this run had no DP.</p>'
    )
    emp_rows = []
    for client, e in empirical.items():
        claimed = e["epsilon-claimed"]
        claimed_f = math.inf if claimed == "inf" else float(claimed)  # type: ignore[arg-type]
        emp_rows.append(
            "<tr>"
            + _cell(client, left=True)
            + _cell(e["canaries"])
            + _cell(e["rounds"])
            + _cell(f"{e['correct']} / {e['guesses']}")
            + _cell(f"{e['delta']:g}")  # type: ignore[str-format]
            + _cell(e["confidence"])
            + _cell(float(e["epsilon-lower-bound"]))  # type: ignore[arg-type]
            + _cell(claimed_f)
            + _cell(
                "refuted" if e["refuted"] else "consistent",
                left=True,
                css="bad" if e["refuted"] else "ok",
            )
            + "</tr>"
        )
    empirical_html = (
        "<h2>Claimed ε against the empirical lower bound</h2>"
        '<p class="note">One-run audit (Steinke, Nasr &amp; Jagielski, NeurIPS 2023): gradient '
        "canaries, each in or out by the auditor's coin; 10% of them guessed in, 10% out; the "
        "number of right guesses bounds ε from below at the stated confidence.</p>"
        '<table><tr><th class="l">client</th><th>canaries</th><th>rounds</th>'
        "<th>right / guesses</th><th>δ</th><th>confidence</th><th>empirical ε ≥</th>"
        '<th>claimed ε</th><th class="l">verdict</th></tr>' + "".join(emp_rows) + "</table>"
        if emp_rows
        else ""
    )
    plot_html = (
        "<h2>ε per round</h2>"
        f'<img alt="cumulative ε per round and client" src="data:image/png;base64,'
        f'{base64.b64encode(plot_png).decode("ascii")}">'
        if plot_png
        else ""
    )
    verdict_css = "ok" if summary.startswith("audit ok") else "bad"
    prov_html = ""
    if provenance is not None:
        prov_html = (
            '<h2>Provenance</h2><table class="prov">'
            + "".join(
                f'<tr><th class="l">{html.escape(k)}</th><td class="l">{html.escape(v)}</td></tr>'
                for k, v in provenance.rows
            )
            + "</table>"
            + "".join(f'<p class="note">{html.escape(n)}</p>' for n in provenance.accountant_notes)
        )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>fedtune audit: {html.escape(str(source))}</title><style>{_STYLE}</style>"
        "</head><body>"
        f"<h1>fedtune privacy audit of {html.escape(str(source))}</h1>"
        f'<p class="{verdict_css}">{html.escape(summary)}</p>'
        f"<p>Neighbouring relation declared by the ledgers: <b>{html.escape(', '.join(relations))}"
        "</b>. ε is recomputed from each ledger at the run's δ with the accountant proven for "
        "the noise its releases added, whose ε decides the verdict (&quot;deciding ε&quot;, "
        "&quot;decided by&quot;): discrete-rdp where a discrete Gaussian on a grid ran (grid "
        "DP-SGD, client-level shares), PRV where the noise was float Gaussian only. The PRV "
        "and RDP ε of the continuous Gaussian are shown beside it for comparison.</p>"
        + prov_html
        + "<h2>Clients</h2>"
        + client_table
        + empirical_html
        + plot_html
        + "<h2>What ε does not cover</h2><ul>"
        + "".join(
            f"<li>{html.escape(t)}</li>"
            for t in (_EVAL_DP if dp_evaluation else _EVAL_PLAIN, *_NOT_COVERED)
        )
        + "</ul>"
        + (
            "<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
            if notes
            else ""
        )
        + "</body></html>\n"
    )
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(page, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot write the report to {str(path)!r}: {err}") from err
