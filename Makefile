# Convenience targets; `bash scripts/test.sh` is the canonical test command (README, CI).
VENV := .venv

.PHONY: install check test unit demo chaos

install:
	bash scripts/install-deps.sh

check:
	bash scripts/check.sh

test:
	bash scripts/test.sh

unit:
	$(VENV)/bin/pytest -q -m "not integration"

demo:
	bash scripts/demo.sh

chaos:
	EDGE_CHAOS_ROUNDS=$${EDGE_CHAOS_ROUNDS:-100} $(VENV)/bin/pytest -q -m chaos -s
