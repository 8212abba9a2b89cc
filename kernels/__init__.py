"""Triton kernels of hbat (this folder installs as the package ``hbat.kernels``)."""
