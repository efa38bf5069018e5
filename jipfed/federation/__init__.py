"""Federation: update codec and validation, streaming aggregation, strategies, compute plans."""
