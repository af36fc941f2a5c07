"""A site's differential privacy, in one place: planning a DP round, gating it on
the budget, recording the ledger and wrapping opacus for every DP loop."""
