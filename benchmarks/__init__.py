"""`make bench`: mercli measured against peers in the same run, reported as ratios."""
