"""sweeps: config schema, search spaces, the Ray Tune driver, MLflow logging and the CLI.

The only package of poisonsweep that imports ray, optuna and mlflow.
"""
