"""Cohort selection: which series at a site make up a training cohort (QIDO-RS, OpenSearch)."""
