"""Evaluation: perplexity, agreement with full depth, lm-eval adapter, exit statistics."""
