"""The embedded data: Fashion-MNIST and the instance-segmentation scenes made
from it."""
