"""The tune stage's search spaces (as data) and its Optuna plots."""
