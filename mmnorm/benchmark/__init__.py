"""The benchmarks that tools/benchmark_layers.py (each layer next to its
baseline: layers.py), tools/benchmark_models.py (whole Mask R-CNN models, one
per method: models.py) and tools/benchmark_maskrcnn.py (torchvision's Mask
R-CNN, one per method: maskrcnn.py) run; what they share is in common.py."""
