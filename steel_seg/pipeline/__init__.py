"""The ablation study as one pipeline: plan (stages, variants, best_of), executors, and the comparison of results."""
