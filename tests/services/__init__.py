"""Tests of the three services, their CLI and the local stack."""
