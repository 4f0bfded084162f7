# snapserve: `make demo` trains, serves and queries an ensemble; `make test` runs the suite.
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (never both).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ORT_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP := $(VENV)/.installed-$(ORT_EXTRA)

.PHONY: install cpp demo test test-all test-cpp proto lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstalls when pyproject.toml or the pins change. Switching ORT build removes the other one first.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	@other=$(if $(filter gpu,$(ORT_EXTRA)),onnxruntime,onnxruntime-gpu); \
	 if $(BIN)/pip show -q $$other >/dev/null 2>&1; then $(BIN)/pip uninstall -q -y $$other; fi
	$(BIN)/pip install -q -c constraints.txt -e ".[$(ORT_EXTRA),train,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The C++ gRPC front end, built once for this source (needs g++ and libgrpc++): from then on the
# server's gRPC port goes through it (--grpc-frontend auto), as in the images.
cpp: $(STAMP)
	$(BIN)/python -m snapserve.server.cpp.binding

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Two workers (pytest-xdist): most tests wait on one core (a pinned server, one training
# thread), so the suite takes about half the time on a 2-core machine.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# The tests of serving again, with the servers they start serving gRPC through the C++ front end
# (the images' default; needs g++ and libgrpc++), the soak profiles included.
SERVING_TESTS := tests/server tests/reliability tests/protocol tests/client tests/e2e tests/http
test-cpp: $(STAMP)
	SNAPSERVE_GRPC_FRONTEND=cpp $(BIN)/python -m pytest -q -n 2 \
		-m "not container and not scripts and not distributed" $(SERVING_TESTS)

# The slower suites too (container build, soak, scripts, distributed).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

proto: $(STAMP)
	$(BIN)/python -m snapserve.proto.generate

clean:
	rm -rf $(VENV) models build *.egg-info .pytest_cache
