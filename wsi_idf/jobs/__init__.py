"""Whole-slide jobs on Dask: the cluster, pack (slide -> archive) and verify (archive -> checked)."""
