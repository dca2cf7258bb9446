"""Training: corpus preparation, tokenizer training, the training loop and its objectives."""
