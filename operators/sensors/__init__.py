"""Sensors of JIP Federated."""
