"""Scoring as the clinic scores: one patient (sliding-window segmentation, then the
experts on the predicted tumour), a site's batch table, and a site's evaluation sums."""
