"""Training: the Accelerate loop over stages (the one place that knows Accelerate) and a whole run."""
