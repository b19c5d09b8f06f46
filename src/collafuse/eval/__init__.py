"""Evaluation: the Fashion-MNIST feature classifier (``classifier``) and distribution distances
between image sets in its feature space, FID, KID and mean pairwise MSE (``quality``)."""
