"""Write the public tuning proxy: WordNet noun definitions that no client holds.

    python simulations/proxy.py [--out runs/proxy.csv]

Tuning a DP recipe on the clients' own data leaks privacy that no ledger counts
(Papernot & Steinke, "Hyperparameter Tuning with Renyi Differential Privacy",
ICLR 2022). fedtune's DP recipe (``simulations/silos-private.toml``) was therefore
chosen on this proxy: the definitions of the eight *next* largest WordNet noun
categories (act, communication, state, attribute, cognition, group, object,
quantity; 27,248 definitions), disjoint from the eight categories the clients
classify (no synset is in both). Same text type, same length distribution, same
8-way task shape; the labels are different ones. ``simulations/tune.py`` runs the
recipe candidates on it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fedtune.data.sources import WORDNET_CATEGORIES, read_wordnet

#: Lexicographer file number -> name of the eight proxy categories (lexnames(5WN)).
PROXY_CATEGORIES: dict[int, str] = {
    4: "act",
    10: "communication",
    26: "state",
    7: "attribute",
    9: "cognition",
    14: "group",
    17: "object",
    23: "quantity",
}
assert not set(PROXY_CATEGORIES) & set(WORDNET_CATEGORIES)  # disjoint from the clients'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/proxy.csv"))
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    args = parser.parse_args()
    rows = [
        (s.definition, PROXY_CATEGORIES[s.lexfile])
        for s in read_wordnet(args.wordnet_dir)
        if s.lexfile in PROXY_CATEGORIES
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} proxy definitions ({len(PROXY_CATEGORIES)} categories) to {args.out}")


if __name__ == "__main__":
    main()
