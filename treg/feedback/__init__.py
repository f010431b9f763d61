"""AI feedback (METHOD.md §4): RLAIF pairwise labels from log-probabilities, direct 1–10 scoring, on-policy pair
building and the soft-label reward-model loss."""
