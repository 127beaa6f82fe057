# Thin aliases; the scripts are the source of truth (they need only bash on a fresh machine).
.PHONY: setup demo test bench clean
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	bash scripts/setup.sh && cd benchmarks && for b in data_prep throughput quality_targets distributed_modes region_heads resilience launch_overhead slurm_overhead; do ../.venv/bin/python $$b.py || exit 1; done
clean:
	rm -rf data runs .pytest_cache
