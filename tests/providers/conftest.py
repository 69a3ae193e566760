"""Fixtures for the provider tests: a moto SQS server for the SQS provider tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the sqs_server helper

from sqs_server import moto_sqs  # noqa: F401  (a session-scoped fixture)
