"""The simulation driver: the one place that imports both apps (``server`` and ``client``).

:func:`fedtune.apps.simulation.driver.simulate` runs a federation on Flower's simulation engine
for ``fedtune simulate`` (:mod:`fedtune.apps.simulation.command`) and the sweep scripts. The
library (``fedtune/`` outside ``fedtune/apps/``) imports neither app; the command imports the
driver only when it runs (the driver brings torch and Flower).
"""
