"""Experiments built on `lbq.train`: the paper's method comparison (`reproduce`)."""
