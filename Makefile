# Thin aliases; the scripts are the source of truth (they need only bash on a fresh machine).
.PHONY: setup demo test bench clean
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
# make bench BENCH_ARGS=--quick (or --list, --only NAME): see benchmarks/run_all.py
bench:
	bash scripts/setup.sh && .venv/bin/python benchmarks/run_all.py $(BENCH_ARGS)
clean:
	rm -rf data runs .pytest_cache
