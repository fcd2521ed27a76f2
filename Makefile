# The README's two commands: `make run` (the dashboard on a bundled sample model) and `make test`.
# Both set up everything a fresh machine needs; a stamp file makes the set-up a no-op afterwards.
PYTHON ?= python3
STAMP := .quantlens/setup-$(shell cat pyproject.toml | sha1sum | cut -c1-12).stamp
PORT ?= 8501

.PHONY: setup run analyze test test-fast e2e bench browser

$(STAMP): pyproject.toml
	@mkdir -p .quantlens
	# torch first and pinned: the CPU wheel on this machine. An unpinned resolve pulls CUDA builds.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	# torch pinned again next to what depends on it (torchao, compressed-tensors, modelopt, torchvision, timm, ray).
	$(PYTHON) -m pip install --quiet torch==2.13.0 -e ".[real,test,hf,llm,vision,ray]"
	@touch $@

setup: $(STAMP)

# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

run: setup
	$(PYTHON) -m analysis.cli dashboard --port $(PORT)

analyze: setup
	$(PYTHON) -m analysis.cli analyze sample:cnn --data sample:cnn --out out/cnn

test: setup browser
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PYTHON) -m pytest -q -m "not e2e and not slow"

bench: setup
	$(PYTHON) benchmarks/bench_sweep.py
	$(PYTHON) benchmarks/bench_block_formats.py
	$(PYTHON) benchmarks/bench_allocator.py
	$(PYTHON) benchmarks/bench_qat.py
	$(PYTHON) benchmarks/bench_big_model.py
	$(PYTHON) benchmarks/bench_workers.py --blocks 2 --sequences 2 --tokens 32
	$(PYTHON) benchmarks/bench_models.py
