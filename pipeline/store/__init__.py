"""The store as a whole: what a storage root holds (``inventory``), what a running flow is using
(``leases``) and what may go (``retention``, behind ``rnnlm ls`` / ``rnnlm gc``).

The one part of ``pipeline`` that reads every other part's layout (datasets, run directories,
the registry), so it sits above them all. Empty on purpose: import the module you need.
"""
