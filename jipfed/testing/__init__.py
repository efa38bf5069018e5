"""Helpers that start real components (Orthanc, S3 server) for tests, demos and benchmarks."""
