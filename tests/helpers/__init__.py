"""Helpers shared by the test files (not collected: no file here is named test_*.py).

- ``cli``: runs driven through train.main (a Ctrl-C at an epoch).
- ``tiny``: tiny data for in-process trainer tests.
- ``data_files``: tiny data files in the real on-disk formats (CIFAR pickles, LMDB, image folders).
"""
