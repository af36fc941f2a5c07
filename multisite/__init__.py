"""Work that spans several sites on one machine: local-only and pooled training
(the comparators), the evaluation over every site's cohorts, and its text."""
