"""Operators of the site DAG: cohort, fetch, convert, preprocess, model, train, upload, clean-up."""
