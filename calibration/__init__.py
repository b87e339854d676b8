"""Data in, statistics out: sources, fixed-shape batches, collectors, the layer-wise engine, cache."""
