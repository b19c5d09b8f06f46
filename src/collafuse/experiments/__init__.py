"""Experiments: sweeps over the cut, baselines (FedAvg, renoise) and the cut advisor."""
