"""The tokenizer: text to token ids and back, exactly as the checkpoint's own tokenizer does it.

A finetune is only as good as its ids: one id off and the model trains on noise that no loss curve
will show. So we do not implement BPE. The Rust `tokenizers` library runs the algorithm; this
package *builds* the right `tokenizers.Tokenizer` from whatever a checkpoint ships and wraps it in
the small interface the data layer and the evaluation code rely on (`Tokenizer`).

Modules, one concept each:
- `tokenizer`: the `Tokenizer` interface (encode, decode, special ids, chat rendering).
- `special_tokens`: which tokens are BOS/EOS/PAD/UNK, checked against the vocabulary.
- `chat_template`: jinja2 chat templates rendered the way transformers renders them, sandboxed.
- `huggingface_dir`, `gguf_metadata`: the two sources (a model directory, a `.gguf` file's metadata).
- `sentencepiece_file`, `sentencepiece_bpe`, `byte_level`, `token_types`: the backends they build.
"""

from qlora.tokenizer.byte_level import GGUF_PRE_TOKENIZERS as _GGUF_PRE_TOKENIZERS
from qlora.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "_GGUF_PRE_TOKENIZERS"]
