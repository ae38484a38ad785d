"""`qsparse train`: `trainer` (Q-Sparse quantization-aware training with straight-through estimators for the
ternary weights, int8 activations and the top-K mask) and `data` (the corpus, its validation split and the
tokenizer it trains)."""
