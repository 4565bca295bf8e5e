"""The ``fedtune`` command: the parser and dispatch, and one module per command group.

Modules
-------
dispatch          the parser of every subcommand, dispatch, and the error-to-exit-code rule
run_commands      the parsers of simulate, evaluate, keygen, export; keygen's function
use_commands      evaluate (also --data FILE), export (also --base-model), predict
audit             ``fedtune audit``: its options, the steps of a run, the exit code
audit_inputs      the ledgers, budget, δ and run config an audit reads
audit_empirical   the canaries' empirical lower bounds on ε
audit_view        the terminal table (100 columns; ``--wide``), the JSON report
audit_plot        the ε plot (identical clients drawn once, named)
audit_provenance  the HTML page's provenance: run, version, dates, sources, accountant
audit_report      the self-contained HTML page of ``--report``

``deploy`` and ``generate`` register themselves from :mod:`fedtune.deploy.cli` and
:mod:`fedtune.cli.generate`. The ``fedtune`` program is :func:`fedtune.apps.cli.main`: it
adds ``simulate`` (:mod:`fedtune.apps.simulation.command`), which starts the simulation
driver and so the apps, which this package does not import.

This package's ``__init__`` imports none of its modules: the program imports
:mod:`fedtune.cli.run_commands` (``simulate``'s parser) to check a ``simulate`` command
line before it imports the commands (torch, transformers: seconds). The parser of every
command is :func:`fedtune.cli.dispatch.build_parser`.
"""

from __future__ import annotations
