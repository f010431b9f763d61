"""Evaluation: generation from a checkpoint (HF, vLLM), pairwise judges (local log-prob, OpenAI-compatible endpoint),
AlpacaEval 2 (through the ``alpaca_eval`` package), Arena-Hard (native, official formats), the training hook and
reports. Knows nothing of the trainer. See docs/evaluation.md."""
