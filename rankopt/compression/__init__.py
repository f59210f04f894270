"""Compression: layer surgery, cost accounting, the spectral cache, rank selection and
latency measurement."""
