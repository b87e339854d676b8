"""Static-K token pruning for vision encoders: selection methods, insertion by hooks, export checks."""
