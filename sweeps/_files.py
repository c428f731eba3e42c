"""The files poisonsweep keeps in Tune's storage (``storage.path``): a launch's folder holds the
launch file; a trial's final checkpoint holds its poison plan, final metrics and resolved config.

The trainable writes them, the mirror (``poisonsweep sync``) and the driver read them.
"""

#: A launch's folder: what ``run --resume`` and ``sync`` need to find its parent run and study.
LAUNCH_FILE = "poisonsweep.json"
#: A trial's final checkpoint: its poison plan, final metrics and resolved config.
PLAN_FILE, METRICS_FILE, CONFIG_FILE = "poison_plan.parquet", "metrics.json", "trial_config.yaml"
#: The key, in a trial's result at a rung's epoch (and so in its ``result.json``), of the early-stopping
#: scheduler's decision there: ``{"epoch", "decision" (promoted|stopped), "place", "of", "kept", ...}``.
DECISION_KEY = "rung_decision"
