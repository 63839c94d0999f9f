.PHONY: run test lint fmt
run:
	scripts/run.sh
test:
	scripts/test.sh
lint:
	.venv/bin/ruff check server tests migrations && .venv/bin/ruff format --check server tests migrations && .venv/bin/mypy
fmt:
	.venv/bin/ruff check --fix server tests migrations && .venv/bin/ruff format server tests migrations
