"""hfbatch: batch jobs for Hugging Face-style NLP on whole corpora."""

__version__ = "0.1.0"
