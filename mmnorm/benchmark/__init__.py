"""The benchmarks that tools/benchmark_layers.py (each layer next to its
baseline) and tools/benchmark_models.py (whole Mask R-CNN models, one per
method) run."""
