"""Secure aggregation: the coordinator learns the sum of the sites' vectors, not
each site's. The protocol's arithmetic, for both sides, on Flower's primitives."""
