"""The hospital's side: everything a site runs on its own machine, in rooms by
concern, each importing only the rooms below it: ``data`` (the site YAML, its
cases, the dataset and the store of preprocessed volumes), ``privacy`` (the DP
rounds, their budget and ledger), ``checks`` (the preflight, the per-case checks,
DP feasibility and the site's private fingerprint), ``training`` (the engine, the
heads, the feature cache, public pretraining), ``scoring`` (a patient scored as the
clinic scores them, batch prediction, a site's evaluation sums) and ``node``
(one federated round at a site, the Flower ClientApp, app pinning)."""
