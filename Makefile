# The two commands: `make demo` and `make test`. Each sets itself up from
# nothing (python3 + the package registries) into .venv/.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
# A local CPU torch wheel, where the machine has one, spares the CUDA build.
TORCH_LINKS := $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,)

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml tools/install_steerling_reference.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_LINKS) -e '.[test,parity]'
	bash tools/install_steerling_reference.sh $(PY)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PY) tools/plan.py --config gin_configs/tiny.py
	$(PY) tools/init_checkpoint.py --config gin_configs/tiny.py --out $(DEMO)/init
	$(PY) tools/explain.py --checkpoint $(DEMO)/init --out $(DEMO)/report.md
	@echo "demo report: $(DEMO)/report.md"

clean:
	rm -rf $(VENV) runs .pytest_cache
