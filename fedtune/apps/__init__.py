"""The Flower apps: the ServerApp (:mod:`fedtune.apps.server`), the ClientApp
(:mod:`fedtune.apps.client`) and the simulation driver (:mod:`fedtune.apps.simulation`),
the one place that imports both. The library under :mod:`fedtune` imports none of them.
"""
