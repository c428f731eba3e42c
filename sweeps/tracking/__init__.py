"""Tracking: the MLflow client (parent and trial runs, params, tags), the mirror of Tune's
storage into MLflow (live, and ``poisonsweep sync`` after an outage), and the trial logger
that feeds it from Tune's events."""
from poison.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "_client": ["FINAL_TAG", "LAUNCH_TAG", "LOST_TAG", "ROLE_TAG", "RUNGS_TAG", "STOPPED_TAG", "Tracker",
                "check_tracking_uri", "latest_launch_path", "redact", "runs_path", "tracking_uri", "trial_name",
                "without_credentials"],
    "_mirror": ["TRACKING_ERRORS", "Backoff", "Launch", "Mirror"],
    "_logger": ["Console", "Printer", "TrialLogger", "TrialRow", "summary_csv", "summary_table", "sweep_note"],
})
