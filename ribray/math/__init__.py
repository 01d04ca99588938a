"""Pure math: models in sequential form, accumulators, bases, Jacobians. No Ray, no I/O."""
