"""The typed configuration of every command besides `qlora train` (`qlora.config.sections`): `generate`,
`chat`, `serve`, `eval` and its modes (`answer`, `judge`, `datatypes`), `merge`, `quantize`, `export-gguf`, `data check`
(`demo`'s is beside it, in `qlora.demo`).

Each is a root `Config`, so its flags, `--help`, config files and error messages are derived exactly
as `train`'s are (`qlora.cli_args`). The model a command loads is the shared `ModelSource` section;
`data check` reads its file with `train`'s own `DataSection` (less the keys about splitting and
batching), so a data file is checked with exactly the settings training will use. The flag
spellings that scripts and the README use are the fields' aliases (`--model`, `--adapter`,
`--prompt`, `--quant-type`, `--double-quant/--no-double-quant`, ...) or a command's own `ALIASES`
(`--dtype` is the compute dtype of `generate`/`eval` but the output dtype of `merge`/`quantize`;
`--type` of `export-gguf` is a GGUF tensor type, not a dtype, and takes only GGUF's names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import ClassVar, Literal

from qlora.config.checks import non_empty_str, non_negative_int, positive_float, positive_int
from qlora.config.errors import ConfigError
from qlora.config.fields import Section, _opt
from qlora.config.names import ComputeDtype, DtypeName, SourceQuantType
from qlora.config.root import Config
from qlora.config.sections import DataSection
from qlora.config.source import (
    ModelSource,
    compute_dtype_field,
    device_field,
    model_path_field,
    source_quant_type_field,
)

GgufType = Literal["f16", "bf16", "q8_0", "f32"]  # GGUF tensor types (qlora.export.gguf_export.GGUF_TYPES)
MergeOnto = Literal["dequantized", "original"]


def _model_field():
    return _opt(doc="The model to load (base, adapter, 4-bit storage, compute dtype, device).")


def _output_field(doc: str, required: bool = True):
    return _opt(doc=doc, alias="--output", check=non_empty_str) if required else \
        _opt(None, doc=doc, alias="--output", check=non_empty_str)  # fmt: skip


def _batch_size_field():
    return _opt(8, doc="Sequences per forward pass.", alias="--batch-size", check=positive_int)


@dataclass(kw_only=True)
class SamplingSection(Section):
    """How new tokens are chosen (`qlora.generate.generate`)."""

    SECTION: ClassVar[str] = "sampling"

    max_new_tokens: int = _opt(128, doc="Most tokens to generate per prompt.", alias="--max-new-tokens",
                               check=positive_int)  # fmt: skip
    temperature: float = _opt(0.0, doc="Sampling temperature; 0 = greedy.", alias="--temperature",
                              check=lambda v: None if v >= 0 else "must be >= 0")  # fmt: skip
    top_p: float = _opt(1.0, doc="Nucleus sampling: keep the smallest set of tokens reaching this probability.",
                        alias="--top-p", check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]")  # fmt: skip
    seed: int = _opt(0, doc="Seed of the sampler.", alias="--seed", check=non_negative_int)


@dataclass(kw_only=True)
class AnswerSamplingSection(SamplingSection):
    """How new tokens are chosen; benchmark answers run longer than `qlora generate`'s default."""

    max_new_tokens: int = _opt(256, doc="Most tokens to generate per answer.", alias="--max-new-tokens",
                               check=positive_int)  # fmt: skip


@dataclass(kw_only=True)
class GenerateConfig(Config):
    """`qlora generate`: text from a base model (+ adapter)."""

    COMMAND: ClassVar[str] = "generate"
    ALIASES: ClassVar[dict[str, str]] = {"model.compute_dtype": "--dtype"}

    model: ModelSource = _model_field()
    prompt: list[str] = _opt(doc="Prompt text; repeat the flag for a batch.", alias="--prompt", append=True)
    sampling: SamplingSection = _opt(doc="Sampling.", factory=SamplingSection)
    chat_template: bool = _opt(
        True,
        doc="Wrap each prompt in the tokenizer's chat template as a user turn, when it has one; off = raw text.",
        alias="--chat-template",
    )


@dataclass(kw_only=True)
class PerplexitySection(Section):
    """Sliding-window perplexity of a text file (`qlora.eval.perplexity`)."""

    SECTION: ClassVar[str] = "perplexity"

    file: str | None = _opt(None, doc="Text file to score; none = no perplexity.", alias="--perplexity",
                            check=non_empty_str)  # fmt: skip
    max_length: int = _opt(1024, doc="Window length in tokens (capped at the model's context).",
                           alias="--max-length", check=positive_int)  # fmt: skip
    stride: int = _opt(512, doc="Stride between windows in tokens; each token is scored once.", alias="--stride",
                       check=positive_int)  # fmt: skip
    max_tokens: int | None = _opt(None, doc="Score only the first N tokens of the text; none = all.",
                                  alias="--max-tokens", check=positive_int)  # fmt: skip


@dataclass(kw_only=True)
class MmluSection(Section):
    """MMLU accuracy as the QLoRA code scores it (`qlora.eval.mmlu`)."""

    SECTION: ClassVar[str] = "mmlu"

    path: str | None = _opt(None, doc="MMLU CSV directory (dev/, test/) or a QLoRA MMLU JSON file; none = no MMLU.",
                            alias="--mmlu", check=non_empty_str)  # fmt: skip
    shots: int = _opt(5, doc="Solved dev examples before each question (CSV only).", alias="--shots",
                      check=non_negative_int)  # fmt: skip
    split: str = _opt("test", doc="MMLU CSV split to score (test, val).", alias="--split", check=non_empty_str)
    subjects: list[str] | None = _opt(None, doc="Only these MMLU subjects; none = all.", alias="--subjects")
    limit: int | None = _opt(None, doc="Only the first N questions of each subject; none = all.", alias="--limit",
                             check=positive_int)  # fmt: skip
    letters: Literal["qlora", "space"] = _opt(
        "qlora", doc="qlora: logits of tokenizer('A')[0] as the QLoRA code; space: of ' A' (lm-eval style).",
        alias="--letters",
    )  # fmt: skip


@dataclass(kw_only=True)
class EvalConfig(Config):
    """`qlora eval`: perplexity and MMLU of a model (+ adapter)."""

    COMMAND: ClassVar[str] = "eval"
    ALIASES: ClassVar[dict[str, str]] = {"model.compute_dtype": "--dtype"}

    model: ModelSource = _model_field()
    perplexity: PerplexitySection = _opt(doc="Perplexity.", factory=PerplexitySection)
    mmlu: MmluSection = _opt(doc="MMLU.", factory=MmluSection)
    batch_size: int = _batch_size_field()
    output: str | None = _output_field("Also write the results here as JSON.", required=False)

    def _check_together(self) -> None:
        if self.perplexity.file is None and self.mmlu.path is None:
            raise ConfigError("nothing to evaluate: give --perplexity FILE and/or --mmlu DIR")


@dataclass(kw_only=True)
class AnswerConfig(Config):
    """`qlora eval answer`: answer a benchmark prompt file (Vicuna, MT-bench, OA); JSONL out."""

    COMMAND: ClassVar[str] = "eval answer"
    ALIASES: ClassVar[dict[str, str]] = {"model.compute_dtype": "--dtype"}

    model: ModelSource = _model_field()
    sampling: AnswerSamplingSection = _opt(doc="Sampling.", factory=AnswerSamplingSection)
    questions: str = _opt(doc="vicuna_questions.jsonl, mt_bench_question.jsonl, oa_questions.jsonl or any JSONL "
                          "with text/turns/input.", alias="--questions", check=non_empty_str)  # fmt: skip
    output: str = _output_field("The answers file to write (JSONL).")
    model_id: str | None = _opt(None, doc="Name recorded with each answer; none = the adapter (or model) path.",
                                alias="--model-id", check=non_empty_str)  # fmt: skip
    template: Literal["auto", "chat", "guanaco", "raw"] = _opt(
        "auto", doc="Prompt template: auto (chat template if the tokenizer has one), chat, guanaco or raw.",
        alias="--template")  # fmt: skip
    limit: int | None = _opt(None, doc="Only the first N questions; none = all.", alias="--limit",
                             check=positive_int)  # fmt: skip
    batch_size: int = _batch_size_field()


@dataclass(kw_only=True)
class JudgeConfig(Config):
    """`qlora eval judge`: judge answer files pairwise (both orders) and rate them by Elo."""

    COMMAND: ClassVar[str] = "eval judge"
    ALIASES: ClassVar[dict[str, str]] = {"compute_dtype": "--dtype"}

    answers: list[str] = _opt(doc="Two or more answer JSONL files (from qlora eval answer).", alias="--answers")
    judge_url: str | None = _opt(None, doc="Base URL of an OpenAI-compatible API (.../v1); POSTs /chat/completions.",
                                 alias="--judge-url", check=non_empty_str)  # fmt: skip
    judge_local: str | None = _opt(None, doc="A local model as judge (logits of 1/2/3): a model directory, "
                                   ".gguf file or hub id.", alias="--judge-local", check=non_empty_str)  # fmt: skip
    judge_model: str = _opt("gpt-4", doc="Model name sent to the endpoint.", alias="--judge-model")
    api_key_env: str = _opt("OPENAI_API_KEY", doc="Environment variable holding the API key.",
                            alias="--api-key-env")  # fmt: skip
    quant_type: SourceQuantType = source_quant_type_field()
    compute_dtype: ComputeDtype = compute_dtype_field()
    device: str = device_field()
    orderings: int = _opt(10_000, doc="Random orderings of the games (the paper: 10,000).", alias="--orderings",
                          check=positive_int)  # fmt: skip
    k: float = _opt(32.0, doc="Elo K-factor (the paper: 32).", alias="--k", check=positive_float)
    initial: float = _opt(1000.0, doc="Initial Elo rating (the paper: 1,000).", alias="--initial")
    seed: int = _opt(0, doc="Seed of the orderings.", alias="--seed", check=non_negative_int)
    judgments: str | None = _opt(None, doc="Write every judgment here (JSONL).", alias="--judgments")
    output: str | None = _output_field("Write the Elo table here (JSON).", required=False)

    def _check_together(self) -> None:
        if (self.judge_url is None) == (self.judge_local is None):
            raise ConfigError("give exactly one judge: --judge-url URL (an API) or --judge-local PATH (a model)")
        if len(self.answers) < 2:
            raise ConfigError(f"--answers needs two or more answer files to compare, got {len(self.answers)}")

    def judge_source(self) -> ModelSource:
        """The local judge model as a `ModelSource` (`qlora.loading.load`); only with --judge-local."""
        return ModelSource(path=self.judge_local, quant_type=self.quant_type, compute_dtype=self.compute_dtype,
                           device=self.device)  # fmt: skip


@dataclass(kw_only=True)
class DatatypesConfig(Config):
    """`qlora eval datatypes`: the paper's data-type table: perplexity and bits/param per 4-bit type."""

    COMMAND: ClassVar[str] = "eval datatypes"
    ALIASES: ClassVar[dict[str, str]] = {"compute_dtype": "--dtype", "perplexity.file": "--text"}

    model: str = model_path_field()
    perplexity: PerplexitySection = _opt(doc="The text and its windows.", factory=PerplexitySection)
    compute_dtype: ComputeDtype = compute_dtype_field()
    device: str = device_field("cpu")
    output: str | None = _output_field("Also write the table here as JSON.", required=False)

    def _check_together(self) -> None:
        if self.perplexity.file is None:
            raise ConfigError("--text / perplexity.file is required: the text file to score (e.g. wiki.test.raw)")


@dataclass(kw_only=True)
class MergeReportSection(Section):
    """The merge report: KL, perplexities and top-1 agreement of base + adapter against the merge."""

    SECTION: ClassVar[str] = "report"

    enabled: bool = _opt(True, doc="Write the merge report (needs held-out text).", alias="--report")
    text: str | None = _opt(None, doc="Held-out text file; none = ../shared's wikitext beside a checkout, if present.",
                            alias="--text", check=non_empty_str)  # fmt: skip
    tokens: int = _opt(4096, doc="Tokens of the text the report evaluates.", alias="--report-tokens",
                       check=positive_int)  # fmt: skip
    seq_len: int = _opt(256, doc="Window length of the report's evaluation.", alias="--report-seq-len",
                        check=positive_int)  # fmt: skip


def _output_dtype_field():
    return _opt("bfloat16", doc="Dtype of the written weights: bfloat16 (bf16), float16 (fp16) or float32 (fp32).",
                alias="--dtype")  # fmt: skip


def _max_shard_field():
    return _opt(2048, doc="Largest safetensors shard, MiB.", alias="--max-shard-size", check=positive_int)


@dataclass(kw_only=True)
class MergeConfig(Config):
    """`qlora merge`: merge a LoRA adapter into its base model and write a Hugging Face directory."""

    COMMAND: ClassVar[str] = "merge"
    HIDDEN: ClassVar[frozenset[str]] = frozenset({"model.compute_dtype", "model.device"})

    model: ModelSource = _model_field()
    output: str = _output_field("New directory for the merged model.")
    dtype: DtypeName = _output_dtype_field()
    onto: MergeOnto = _opt(
        "dequantized",
        doc="Add the LoRA delta to the dequantized 4-bit base the adapter trained against (base + adapter "
        "exactly), or to the original 16-bit weights (PEFT's merge_and_unload on a 16-bit base).",
        alias="--onto",
    )
    report: MergeReportSection = _opt(doc="The merge report.", factory=MergeReportSection)
    max_shard_size: int = _max_shard_field()

    def _check_together(self) -> None:
        if self.model.adapter is None:
            raise ConfigError("--adapter / model.adapter is required: the adapter directory to merge")


@dataclass(kw_only=True)
class QuantizeConfig(Config):
    """`qlora quantize`: write a bitsandbytes 4-bit checkpoint that transformers + bitsandbytes load."""

    COMMAND: ClassVar[str] = "quantize"
    HIDDEN: ClassVar[frozenset[str]] = frozenset({"model.adapter", "model.compute_dtype", "model.device"})

    model: ModelSource = _model_field()
    output: str = _output_field("New directory for the 4-bit checkpoint.")
    dtype: DtypeName = _output_dtype_field()
    max_shard_size: int = _max_shard_field()

    def _check_together(self) -> None:
        if self.model.quant_type not in ("auto", "nf4", "fp4"):
            raise ConfigError(f"--quant-type / model.quant_type must be nf4 or fp4 for a bitsandbytes checkpoint, "
                              f"got {self.model.quant_type!r}")  # fmt: skip


@dataclass(kw_only=True)
class ExportGgufConfig(Config):
    """`qlora export-gguf`: the model (+ adapter, merged) as a GGUF file for llama.cpp, tokenizer included."""

    COMMAND: ClassVar[str] = "export-gguf"
    HIDDEN: ClassVar[frozenset[str]] = frozenset({"model.compute_dtype", "model.device"})

    model: ModelSource = _model_field()
    output: str = _output_field("The .gguf file to write.")
    type: GgufType = _opt("f16", doc="GGUF type of the matrices: f16, bf16, q8_0 or f32 (1-D tensors are always "
                          "f32). A file format, not a compute dtype.", alias="--type")  # fmt: skip
    onto: MergeOnto | None = _opt(None, doc="With --adapter: merge onto the dequantized 4-bit base or the 16-bit "
                                  "originals; none = dequantized.", alias="--onto")  # fmt: skip


@dataclass(kw_only=True)
class DataCheckSection(DataSection):
    """The data file and how training cuts it into examples; `--lang` takes one language per flag."""

    # One item per flag, as `qlora data check --lang de --lang en` always took it: a list flag taking several
    # values would also swallow the positional FILE after it (`--lang de data.jsonl`).
    languages: list[str] | None = _opt(
        None,
        doc="OASST1 only: keep conversations in these language codes, one per flag (--lang en --lang es); none = all.",
        alias="--lang",
        append=True,
    )


@dataclass(kw_only=True)
class DataCheckConfig(Config):
    """`qlora data check`: read a data file as `qlora train` would (same tokenizer, same limits) and audit it."""

    COMMAND: ClassVar[str] = "data check"
    # How training splits and batches the examples does not change what each example is.
    HIDDEN: ClassVar[frozenset[str]] = frozenset(
        {"data.eval_fraction", "data.eval_max_examples", "data.pack_len", "data.group_by_length"}
    )
    POSITIONAL: ClassVar[dict[str, str]] = {"data.path": "FILE"}  # qlora data check data.jsonl --model PATH
    # The spellings of the command's first parser (README, scripts).
    ALIASES: ClassVar[dict[str, str]] = {
        "data.format": "--format",
        "data.max_source_len": "--max-source-len",
        "data.max_target_len": "--max-target-len",
        "data.train_on_source": "--train-on-source",
    }

    model: str = model_path_field()
    data: DataCheckSection = _opt(doc="The data file and how training cuts it into examples.")


def _split_adapter(entry: str) -> tuple[str, str]:
    """`NAME=DIR` -> (NAME, DIR); a bare `DIR` is named after its last part."""
    name, sep, directory = entry.partition("=")
    if not sep:
        name, directory = PurePath(entry).name, entry
    return name.strip(), directory.strip()


def _adapter_entries(v: list[str]) -> str | None:
    """`--adapter NAME=DIR` (or DIR): names and directories non-empty, names distinct."""
    names = []
    for entry in v:
        name, directory = _split_adapter(entry)
        if not name or not directory:
            return f"must be NAME=DIR or DIR with a non-empty name and directory (got {entry!r})"
        names.append(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    return f"must not repeat an adapter name ({', '.join(repeated)})" if repeated else None


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a TCP port in [0, 65535] (0 = any free port)"


def _max_len_field(default: int):
    return _opt(default, doc="Positions per sequence in the KV cache: prompt + new tokens must fit (longer prompts "
                "are refused).", alias="--max-len", check=positive_int)  # fmt: skip


@dataclass(kw_only=True)
class ServeConfig(Config):
    """`qlora serve`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models)."""

    COMMAND: ClassVar[str] = "serve"
    ALIASES: ClassVar[dict[str, str]] = {"model.compute_dtype": "--dtype"}
    HIDDEN: ClassVar[frozenset[str]] = frozenset({"model.adapter"})  # --adapter is `adapters` here: several

    model: ModelSource = _model_field()
    adapters: list[str] = _opt(
        doc="A LoRA adapter to serve on the base, as NAME=DIR (or DIR: named after the directory); repeat the flag "
        "for several. A request's `model` field picks one by NAME; the base model's name picks none.",
        alias="--adapter", append=True, check=_adapter_entries, factory=list,
    )  # fmt: skip
    served_model_name: str | None = _opt(None, doc="The base model's name in /v1/models and requests; none = the "
                                         "model path's last part.", alias="--served-model-name",
                                         check=non_empty_str)  # fmt: skip
    host: str = _opt("127.0.0.1", doc="Address to listen on (0.0.0.0: every interface).", alias="--host",
                     check=non_empty_str)  # fmt: skip
    port: int = _opt(8000, doc="TCP port to listen on.", alias="--port", check=_port)
    slots: int = _opt(8, doc="Requests decoded together in one batch; more wait for a free slot.", alias="--slots",
                      check=positive_int)  # fmt: skip
    max_len: int = _max_len_field(4096)
    cuda_graphs: bool = _opt(True, doc="On CUDA, replay each decoding step as one CUDA graph.", alias="--cuda-graphs")

    def adapter_dirs(self) -> dict[str, str]:
        """The adapters to serve: name -> directory, in the order given."""
        return dict(_split_adapter(entry) for entry in self.adapters)


@dataclass(kw_only=True)
class ChatSamplingSection(SamplingSection):
    """How new tokens are chosen in a chat (greedy by default); a reply runs longer than `qlora generate`'s."""

    max_new_tokens: int = _opt(512, doc="Most tokens in one reply.", alias="--max-new-tokens", check=positive_int)
    top_k: int = _opt(0, doc="Keep only the k most likely tokens; 0 = all.", alias="--top-k", check=non_negative_int)
    repetition_penalty: float = _opt(1.0, doc="Above 1 discourages tokens already in the conversation.",
                                     alias="--repetition-penalty", check=positive_float)  # fmt: skip


@dataclass(kw_only=True)
class ChatConfig(Config):
    """`qlora chat`: talk with a model (+ adapter) in the terminal, in its chat template, the reply streamed."""

    COMMAND: ClassVar[str] = "chat"
    ALIASES: ClassVar[dict[str, str]] = {"model.compute_dtype": "--dtype"}

    model: ModelSource = _model_field()
    sampling: ChatSamplingSection = _opt(doc="Sampling.", factory=ChatSamplingSection)
    system: str | None = _opt(None, doc="A system message at the start of the conversation; none = the template's "
                              "own default.", alias="--system", check=non_empty_str)  # fmt: skip
    max_len: int = _max_len_field(4096)
    cuda_graphs: bool = _opt(True, doc="On CUDA, replay each decoding step as one CUDA graph.", alias="--cuda-graphs")
