"""The math, written by hand once: ops (plain, buffered, fused), layers, losses, the SGD rule and the model."""
