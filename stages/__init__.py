"""mergesweep: rebuild, sweep and audit a linear merge of two fine-tunes."""
