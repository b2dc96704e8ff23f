"""Training: acting, rollouts, the learner step, the Trainer and its outputs."""
