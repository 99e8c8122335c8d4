"""Configuration: the params.yaml schema, loading with ensemble-member overrides, and presets.

params.yaml is the only home of a default value; :mod:`.schema` states types and bounds only.
"""

from products10k.config.load import *  # noqa: F403
from products10k.config.schema import *  # noqa: F403
