"""Training at a site: the engine (joint rounds), the heads over cached tumour
features, the feature cache and pretraining on public data."""
