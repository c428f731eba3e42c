"""The minimal poison budget: the sequential search's statistics (a dose-response fit and its
confidence interval) and the driver that runs its rounds of real trials."""
from poison.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "_stats": ["BudgetSearch", "Estimate", "Point"],
    "_search": ["BudgetOptions", "BudgetOutcome", "prepare_budget", "run_budget", "summary"],
})
