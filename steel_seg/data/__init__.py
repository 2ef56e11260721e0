"""Data side of the pipeline: Severstal RLE and CSV, PaddleX SEG layout, splits, cache, demo data."""
