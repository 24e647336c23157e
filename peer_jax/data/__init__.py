"""Tokenizer, text sources and the grain input pipeline."""
