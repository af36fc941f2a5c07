"""Coordinator side: the Flower ServerApp, grouped strategy, run records, deployment."""
