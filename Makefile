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

# The C4 sample of $(DATA) when it is there, else the one embedded in the package
# (src/osd/assets, osd.data.sample_paths()), so that `make train` runs on a fresh machine.
SHARED_FILES := $(DATA)/c4-sample/c4-sample-train.json.gz $(DATA)/c4-sample/c4-sample-validation.json.gz \
  $(DATA)/tokenizers/t5-base/tokenizer.json
ifeq ($(words $(wildcard $(SHARED_FILES))),3)
TRAIN_DATA := --dataset $(DATA)/c4-sample/c4-sample-train.json.gz \
  --eval_dataset $(DATA)/c4-sample/c4-sample-validation.json.gz --tokenizer $(DATA)/tokenizers/t5-base
TRAIN_NOTE := data: $(DATA)/c4-sample (shared: 1,800 train and 200 held-out eval C4 documents), tokenizer $(DATA)/tokenizers/t5-base
else
SAMPLE := src/osd/assets
TRAIN_DATA := --dataset $(SAMPLE)/c4-quickstart/train.json.gz \
  --eval_dataset $(SAMPLE)/c4-quickstart/validation.json.gz --tokenizer $(SAMPLE)/t5-base
TRAIN_NOTE := data: embedded quickstart sample (no $(DATA)/c4-sample here): 160 train and 40 held-out eval C4 documents, t5-base tokenizer, in $(SAMPLE)
endif

train: venv
	@echo "$(TRAIN_NOTE)"
	$(PY) -m osd.train --config configs/quickstart.toml $(TRAIN_DATA)

.PHONY: venv test train
