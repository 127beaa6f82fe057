# Thin aliases; the scripts are the source of truth (they need only bash on a fresh machine).
.PHONY: setup demo test bench clean
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && .venv/bin/python benchmarks/run_all.py
clean:
	rm -rf data runs .pytest_cache
