"""Typed configuration: dataclasses with a docstring per field are the single source of every command's
knobs; flags and `--help` (`qlora.cli_args`), config files (`files`) and error messages derive from them.

    names.py     the name tables: optimizers, dtypes and their aliases, 4-bit types, DEFAULT_TARGETS
    errors.py    ConfigError
    checks.py    value checks ("must be a positive integer")
    coercion.py  a value against its field's annotation (int -> float, "bf16" -> "bfloat16")
    fields.py    _opt (a field with help, alias, check) and Section (validated dataclass)
    options.py   Option / config_options: the fields as the command line sees them
    root.py      Config (a command's root: strict from_dict, to_yaml) and check_tree
    source.py    ModelSource: the model a command loads, shared by every command
    sections.py  TrainConfig and its sections
    commands.py  GenerateConfig, EvalConfig, AnswerConfig, JudgeConfig, DatatypesConfig, MergeConfig,
                 QuantizeConfig, ExportGgufConfig, DataCheckConfig (+ DataCheckSection)
    files.py     TOML / YAML / JSON config files

Precedence when a command is configured: dataclass defaults < config file < command-line flags.
The package imports no other `qlora` module and not torch: any floor may import it, and parsing
flags or reading a config file needs neither a model nor an accelerator.
"""

from qlora.config.checks import SUPPORTED_BLOCKSIZES
from qlora.config.coercion import coerce, describe_type, unwrap_optional
from qlora.config.commands import (
    AnswerConfig,
    DataCheckConfig,
    DataCheckSection,
    DatatypesConfig,
    EvalConfig,
    ExportGgufConfig,
    GenerateConfig,
    JudgeConfig,
    MergeConfig,
    MergeReportSection,
    MmluSection,
    PerplexitySection,
    QuantizeConfig,
    SamplingSection,
)
from qlora.config.errors import ConfigError
from qlora.config.fields import Section, _opt, flag_for
from qlora.config.files import load_config_file, merge_config_dicts, read_config
from qlora.config.names import (
    AUTO,
    DEFAULT_TARGETS,
    DTYPE_ALIASES,
    DTYPE_NAMES,
    OPTIMIZER_NAMES,
    ComputeDtype,
    DtypeName,
    OptimName,
    QuantType,
    canonical_dtype_name,
)
from qlora.config.options import Option, config_options
from qlora.config.root import Config, check_tree
from qlora.config.sections import (
    LARGE_MODEL_PARAMS,
    PAPER_DEFAULTS_BY_SIZE,
    DataSection,
    LoopSection,
    LoraSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    QuantSection,
    TrainConfig,
    resolve_size_defaults,
)
from qlora.config.source import ModelSource

__all__ = [
    "AUTO",
    "DEFAULT_TARGETS",
    "DTYPE_ALIASES",
    "DTYPE_NAMES",
    "LARGE_MODEL_PARAMS",
    "OPTIMIZER_NAMES",
    "PAPER_DEFAULTS_BY_SIZE",
    "SUPPORTED_BLOCKSIZES",
    "AnswerConfig",
    "ComputeDtype",
    "Config",
    "ConfigError",
    "DataCheckConfig",
    "DataCheckSection",
    "DataSection",
    "DatatypesConfig",
    "DtypeName",
    "EvalConfig",
    "ExportGgufConfig",
    "GenerateConfig",
    "JudgeConfig",
    "LoopSection",
    "LoraSection",
    "MergeConfig",
    "MergeReportSection",
    "MmluSection",
    "ModelSection",
    "ModelSource",
    "OptimName",
    "OptimSection",
    "ParallelSection",
    "Option",
    "PerplexitySection",
    "QuantSection",
    "QuantType",
    "QuantizeConfig",
    "SamplingSection",
    "Section",
    "TrainConfig",
    "_opt",
    "canonical_dtype_name",
    "check_tree",
    "coerce",
    "config_options",
    "describe_type",
    "flag_for",
    "load_config_file",
    "merge_config_dicts",
    "read_config",
    "resolve_size_defaults",
    "unwrap_optional",
]
