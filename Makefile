VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint
setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/jipfed demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
