"""Sparsity studies: reading a results folder into one table (``study.report``) and its plots."""
