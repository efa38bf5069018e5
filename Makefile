VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint lock
setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/jipfed demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

# Re-resolve the pinned sets in requirements/ (see scripts/lock.py); commit the changed *.txt.
lock:
	python3 scripts/lock.py
