"""Model sources and the model cache: `kvops model pull` and `--model hf://... | s3://... | ...`.

sources.py parses a source; hf.py and s3.py list and fetch a remote revision; cache.py lays out,
locks, verifies and finishes cache entries; pull.py ties them together; progress.py logs the
progress line; cli.py registers `kvops model pull`.
"""
