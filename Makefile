# hfbatch: `make run` (demo) and `make test` are the two commands the README promises on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast quality style ingest embed index search demo-queries clean

help:  ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install hfbatch with its test extras

ingest: $(STAMP)  ## Ingest data/ into $(OUT)/dataset
	$(BIN)/hfbatch ingest data/sample.jsonl -o $(OUT)/dataset

embed: ingest  ## Embed $(OUT)/dataset with the bundled model
	$(BIN)/hfbatch embed $(OUT)/dataset -o $(OUT)/embeddings

index: embed  ## Build a FAISS index over $(OUT)/embeddings
	$(BIN)/hfbatch index $(OUT)/embeddings -o $(OUT)/index

search: index  ## Three example searches, printed as ranked hits
	@$(BIN)/hfbatch search $(OUT)/index -k 3 --format text \
		"a chess game for two players" "library for parsing JSON" "monitor network traffic"

run: search  ## The demo: ingest data/ -> embed -> index -> search

test: $(STAMP)  ## Run the whole test suite (slow tests included)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## Tests without the slow ones
	$(BIN)/python -m pytest -q -m "not slow"

quality: $(STAMP)  ## Lint
	$(BIN)/python -m ruff check lib jobs tests bench || $(BIN)/python -m pip install -q ruff && $(BIN)/python -m ruff check lib jobs tests bench

style: $(STAMP)  ## Format
	$(BIN)/python -m pip install -q ruff && $(BIN)/python -m ruff format lib jobs tests bench

clean:  ## Remove demo outputs
	rm -rf $(OUT)
