"""Studies over many runs: attribution over file subsets, hyperparameter search, the time forecast."""
