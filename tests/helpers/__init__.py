"""Helpers shared by the test files (not collected: no file here is named test_*.py).

- ``cli``: train.main run as a user runs it: a quick run that must finish (its run folder back), bad
  input that must be refused (exit 2, one ``error:`` line, no run folder), a Ctrl-C at an epoch.
- ``processes``: ``python train.py`` runs as processes of their own, forked after the imports.
- ``tiny``: tiny models, batches, loaders and optimizer settings for in-process trainer tests.
- ``data_files``: tiny data files in the real on-disk formats (CIFAR pickles, LMDB, image folders).
"""
