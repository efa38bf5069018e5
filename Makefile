VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint lock bundle
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

# Offline install bundle (wheels of the pinned sets, charts, image contexts, SHA256SUMS) in dist/bundle.
# Kaapana's charts depend on its dag-installer-chart: KAAPANA_DIR=<kaapana checkout> packages it too.
BUNDLE_ARGS ?=
bundle: setup
	$(BIN)/python -m jipfed.packaging.bundle build --out dist/bundle $(if $(KAAPANA_DIR),--dag-installer-chart $(KAAPANA_DIR)/services/utils/dag-installer-chart) $(BUNDLE_ARGS)
