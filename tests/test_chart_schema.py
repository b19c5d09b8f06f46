"""The chart's `federation` schema is generated from FederationConfig and must stay in step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from collafuse.config import FederationConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "deploy" / "federation_schema.py"


def test_the_chart_schema_is_the_models() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_every_model_field_and_only_those_are_in_the_chart() -> None:
    schema = json.loads((ROOT / "charts" / "collafuse" / "values.schema.json").read_text())
    federation = schema["properties"]["federation"]
    assert federation["additionalProperties"] is False
    assert set(federation["properties"]) == set(FederationConfig.model_fields)
    model = federation["properties"]["site_model"]
    assert "attention_levels" in model["properties"] and model["additionalProperties"] is False
