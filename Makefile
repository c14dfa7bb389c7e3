# Each target does its own set-up: a .venv with torch pinned to the CPU wheel (constraints.txt).
PY := .venv/bin/python
DATA ?= ../shared/data
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: .venv/.installed

test: venv
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

train: venv
	$(PY) -m osd.train --config configs/quickstart.toml \
	  --dataset $(DATA)/c4-sample/c4-sample-train.json.gz \
	  --eval_dataset $(DATA)/c4-sample/c4-sample-validation.json.gz \
	  --tokenizer $(DATA)/tokenizers/t5-base

.PHONY: venv test train
