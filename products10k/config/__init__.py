"""Configuration: the params.yaml schema (:mod:`.schema`), loading it with ensemble-member
overrides and the finetune phases on top of ``train`` (:mod:`.load`), and presets (:mod:`.presets`).

params.yaml is the only home of a default value; the schema states types and bounds only.
"""

from products10k.config.load import (
    apply_overrides,
    from_dict,
    load_section,
    load_yaml,
    member_names,
    member_params,
    phase_config,
    section,
    set_dotted,
)
from products10k.config.schema import (
    PHASES,
    SECTIONS,
    BalanceConfig,
    DataConfig,
    DistConfig,
    EnsembleConfig,
    EvaluateConfig,
    ExportConfig,
    KaggleConfig,
    KaggleSubmitConfig,
    ModelConfig,
    Phase,
    PhaseConfig,
    PrepareConfig,
    RetrievalConfig,
    Section,
    SubmitConfig,
    SyntheticConfig,
    TTAConfig,
)

__all__ = [
    "PHASES",
    "SECTIONS",
    "BalanceConfig",
    "DataConfig",
    "DistConfig",
    "EnsembleConfig",
    "EvaluateConfig",
    "ExportConfig",
    "KaggleConfig",
    "KaggleSubmitConfig",
    "ModelConfig",
    "Phase",
    "PhaseConfig",
    "PrepareConfig",
    "RetrievalConfig",
    "Section",
    "SubmitConfig",
    "SyntheticConfig",
    "TTAConfig",
    "apply_overrides",
    "from_dict",
    "load_section",
    "load_yaml",
    "member_names",
    "member_params",
    "phase_config",
    "section",
    "set_dotted",
]
