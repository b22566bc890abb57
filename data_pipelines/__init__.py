"""grain input pipelines, image/text transforms, tokenizers and built-in synthetic data."""
