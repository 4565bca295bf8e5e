"""The simulation driver: the one place that imports both apps (``server`` and ``clients``).

:func:`fedtune.apps.simulation.driver.simulate` runs a federation on Flower's simulation engine
for ``fedtune simulate`` and the sweep scripts. The library (``fedtune/``) imports
neither app; the CLI imports this package only when asked to simulate.
"""
