"""Evaluation: the instruments the QLoRA paper judges a finetune with.

- `perplexity`: sliding-window perplexity on a text (transformers' guide; each token scored once);
- `mmlu_data`, `mmlu`: MMLU 0/k-shot with the QLoRA code's scoring (A-D logits at the answer position);
- `scoring`: the candidate-token logits at each prompt's last position (MMLU and the local judge);
- `shares`: perplexity windows and MMLU questions split over the ranks of a torchrun job;
- `benchmarks`: answers to benchmark prompt files (Vicuna, MT-bench first turns, OA) as JSONL;
- `judge`, `elo`: pairwise judging in both orders (an OpenAI-compatible endpoint or a local model)
  and the Elo tournament of the paper's Table 7;
- `datatypes`: the paper's data-type table (NF4, NF4+DQ, FP4, INT4, 16-bit) at small scale;
- `cli`: `qlora eval`.
"""
