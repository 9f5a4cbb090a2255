# The README's two commands: `make demo` (set up everything, run the demo shop) and `make test`.
.PHONY: demo test venv lint

demo: venv
	DEBUG=$${DEBUG:-1} .venv/bin/python manage.py demo

test: venv
	.venv/bin/python -m pytest

venv:
	@scripts/venv.sh

lint: venv
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check .
	.venv/bin/python -m mypy
