"""TTA beyond one evaluation: re-scoring finished runs, choosing views, sensitivity analysis."""
