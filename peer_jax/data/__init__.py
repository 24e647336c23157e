"""Tokenizer, text sources and the grain input pipeline."""

from peer_jax.data.pipeline import (DataIterator, EvalIterator, TextDataIterator, eval_sources,
                                    global_batch, make_eval_iterator, make_train_iterator,
                                    merge_process_states, to_model_batch)
from peer_jax.data.sources import DataError, parse_sources
from peer_jax.data.tokenizer import Tokenizer
