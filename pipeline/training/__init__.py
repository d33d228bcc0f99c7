"""The training stage: one run directory from a dataset and a configuration.

Owns the loop (``train``) and its state (``run_state``, ``checkpoint``, ``rundir``, ``metrics``),
optimisation (``optim``, ``averaging``, ``stopping``, ``divergence``, ``precision``), ranks
(``distributed``, ``cpu_threads``) and the launchers that start them (``launch``, ``processes``,
``ray_launch``). May import ``data``, ``model`` and the shared core; never ``registry``. Empty on
purpose: importing one module pulls in only what it needs.
"""
