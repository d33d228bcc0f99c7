"""The model: recurrent language models and what is done with a trained one.

Owns the cells and stacks (``cells``, ``models``, ``regularization``), scoring (``evaluate``),
generation (``generate``) and a loadable trained model (``lm``). May import ``pipeline.data`` (the
tokenizer, a dataset's vocabulary) and the shared core; never ``training`` or ``registry``. These
modules (with ``data/tokenizer.py``) are shipped inside every registered model, so they stay free of
the orchestrator and of MLflow. Empty on purpose: importing one module pulls in only what it needs.
"""
