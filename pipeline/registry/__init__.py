"""The registry stage: MLflow tracking, model packaging, the champion/challenger gate, consumers.

Owns the tracking store (``tracking``), logging a finished run (``run_logging``, ``run_record``,
``run_checks``), the self-contained pyfunc (``packaging``, ``mlflow_model``), promotion (``gate``),
pinning the champion's vocabulary (``champion_vocab``) and loading a registered model
(``consumer``). May import ``data``, ``model`` and the shared core; of ``training`` only a run
finished run's metrics file (``training.metrics``). Empty on purpose: importing one module
pulls in only what it needs.
"""
