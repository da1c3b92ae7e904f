# catalog-index: the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
VENV  := .venv
STAMP := $(VENV)/.installed
SIZE  ?= 1000
WAREHOUSE ?= file://$(CURDIR)/warehouse

.PHONY: setup run test chaos airflow clean help

help:
	@echo "make run    - run the whole pipeline on the bundled sample catalog (SIZE=$(SIZE), SIZE=all for ~8,100 images) into $(WAREHOUSE)"
	@echo "make test   - run the test suite (unit + integration: real Spark, HTTP, S3 over HTTP)"
	@echo "make chaos  - the long fault and property runs (10x the seeded runs of make test: S3 faults, races, kill -9, multi-night feeds, SSRF URLs)"
	@echo "make setup  - install Debian packages and the .venv (both targets above call it)"
	@echo "make airflow - start Airflow (standalone, SQLite) with the catalog-index DAGs on http://localhost:8080"

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml infra/setup.sh
	bash infra/setup.sh
	@touch $(STAMP)

run: setup
	SIZE=$(SIZE) WAREHOUSE=$(WAREHOUSE) bash infra/run_sample.sh

test: setup
	$(VENV)/bin/python -m pytest -q

# The same fault-injection and property tests as `make test`, with 10x the seeded runs (~15-20 min).
chaos: setup
	CATALOG_INDEX_CHAOS=$${CATALOG_INDEX_CHAOS:-10} CATALOG_INDEX_SSRF_EXAMPLES=$${CATALOG_INDEX_SSRF_EXAMPLES:-2000} \
	$(VENV)/bin/python -m pytest -q tests/test_warehouse_faults.py tests/test_multi_night.py tests/test_ssrf.py \
	tests/test_untrusted_pointers.py tests/test_kill_resume.py

airflow: setup
	AIRFLOW_HOME=$(CURDIR)/airflow-home AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags AIRFLOW__CORE__LOAD_EXAMPLES=False \
	CATALOG_INDEX_WAREHOUSE=$(WAREHOUSE) CATALOG_INDEX_MANIFEST=$(CURDIR)/sample/manifest.csv \
	bash -c '$(VENV)/bin/airflow db migrate >/dev/null && \
	  $(VENV)/bin/airflow pools set catalog_index_publish 1 "catalog-index build_index + publish, both DAGs" >/dev/null && \
	  exec $(VENV)/bin/airflow standalone'

clean:
	rm -rf warehouse sample .pytest_cache
