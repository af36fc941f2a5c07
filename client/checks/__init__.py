"""The site's preflight: the whole-site check, the per-case checks, DP feasibility
and the private fingerprint the federation is planned from."""
