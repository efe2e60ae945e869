"""Training: the run config, model selection, the linear probe, the accelerate loop, checkpoints, evaluation,
trackers, and `finetune`, which runs them all for one job."""
