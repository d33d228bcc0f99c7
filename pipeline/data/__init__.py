"""The data stage: raw corpora -> tokens -> vocabulary -> verified Parquet shards -> training batches.

Owns fetching and normalising corpora (``corpus``), tokenizers (``tokenizer``), vocabularies
(``vocab``), the content-addressed dataset on disk (``shards``, ``prepare``, ``integrity``), and
reading a split back as minibatches (``training_data``, ``sampling``). Imports only the shared core
(``pipeline.config``, ``storage``, ``errors``, ``code_version``): never ``model``, ``training`` or
``registry``. Empty on purpose: importing one module pulls in only what it needs.
"""
