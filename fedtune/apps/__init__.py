"""The top layer: the Flower apps and the ``fedtune`` program.

The ServerApp (:mod:`fedtune.apps.server`), the ClientApp (:mod:`fedtune.apps.client`),
the simulation driver (:mod:`fedtune.apps.simulation`, the one place that imports both)
and the ``fedtune`` console script (:mod:`fedtune.apps.cli`: the library's commands of
:mod:`fedtune.cli` plus ``simulate``). The library under :mod:`fedtune` imports none of
them (``tests/test_layout.py``).
"""
