"""What the small-scale studies share: the Fashion-MNIST classifier and metric,
and the reader of the runs' scalars."""
