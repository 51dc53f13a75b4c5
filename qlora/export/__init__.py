"""Floor 7: taking a finetuned model elsewhere, and bringing pre-quantized checkpoints in.

- `merge`: base + LoRA adapter -> one dense Hugging Face directory (onto the original 16-bit
  weights or onto the dequantized 4-bit base the adapter trained against), with a report of how
  far the merged model is from base + adapter on held-out text (`report`);
- `bnb_checkpoint`: a model -> a bitsandbytes 4-bit directory that transformers + bitsandbytes load
  with `from_pretrained` (and `qlora.load_model` loads without re-quantizing);
- `gguf_export`: base (+ adapter) -> a GGUF file for llama.cpp, with tokenizer and chat template.

Each is a thin layer over the loaders (`qlora.loading`, `qlora.checkpoint_io`) and the quantization
floor; the commands are in `qlora.export.commands`.
"""
