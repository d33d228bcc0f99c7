"""rnnlm's library: corpus -> tokens -> vocabulary -> Parquet shards -> recurrent LM -> registry.

Plain Python on torch, pyarrow and fsspec; nothing here imports Prefect. This
``__init__`` stays empty on purpose so that importing one module (the model, say,
inside a self-contained MLflow model) pulls in only what that module needs.
"""
