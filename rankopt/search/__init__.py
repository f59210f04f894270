"""The search engine of studies: the search space, one trial, the local and Ray backends,
the Optuna storage and sampler, the reference model, and the live display."""
