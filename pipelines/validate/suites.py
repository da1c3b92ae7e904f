"""Expectation suites from `schemas/gx/*.json`, run with Great Expectations on Spark DataFrames.

- `load_suite` / `read_suite`: read a reviewable suite file (GX 1.x ExpectationSuite JSON);
  `load_suite` also checks that GX can build every expectation in it. Thresholds are
  `{"$PARAMETER": name}` references, filled in at run time from `ValidateSettings` (or from
  the previous run, for categories).
- `row_checks`: the suite's critical row-level expectations as Spark conditions (each built
  by pipelines.validate.failing_rows, which finds the failing rows).
- `run_suite`: validate a Spark DataFrame through GX's Spark datasource (a whole-dataframe
  batch in an ephemeral context) and write the Data Docs HTML site into a local folder.

Cost: a validation is a handful of Spark queries whatever the suite's size. GX bundles its
aggregate metrics (one query per dependency level; uniqueness adds a window count), and two
small adjustments to GX, applied on first use, keep it that way: it does not query failing
values nobody asked for, and its bundled aggregate reads the same every run so that Spark
reuses the compiled code (`_skip_unrequested_failing_values`, `_stable_metric_bundles`).

Severity decides what a failure does: `critical` row-level expectations quarantine rows,
`critical` batch-level ones stop the run (see `pipelines.validate.gates`), `warning`/`info`
ones are flagged in the report only. An expectation type that pipelines.validate.failing_rows
cannot express as a Spark filter is treated as batch-level: it stops the run rather than let
bad rows through.

GX is imported on first use (`_import_gx`, one thread at a time), never with this module; the
Data Docs views GX's site builder looks up here are built on first use too (`__getattr__`).
This module must never collect a whole table to the driver: GX computes its metrics in Spark.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import UsageError
from pipelines.validate.failing_rows import (
    RowCheck,
    checked_columns,
    is_row_level,
    row_check,
)

SUITES_DIR = Path(__file__).resolve().parents[2] / "schemas" / "gx"
PARAMETER = "$PARAMETER"
CRITICAL = "critical"
_DOCS_SITE = "run_reports"


class SuiteError(UsageError):
    """A suite file is unusable, or a parameter it names was not given; the message says which."""


# ---------------------------------------------------------------------------------------
# suite files
# ---------------------------------------------------------------------------------------

def expectation_name(config: dict[str, Any]) -> str:
    """Stable, machine-readable name of one expectation: its type and the columns it checks,
    e.g. `expect_column_values_to_be_between:width`. Quarantine reasons use it."""
    kwargs = config.get("kwargs", {})
    if "column" in kwargs:
        return f"{config['type']}:{kwargs['column']}"
    if "column_list" in kwargs:
        return f"{config['type']}:{'+'.join(kwargs['column_list'])}"
    if "column_A" in kwargs:
        return f"{config['type']}:{kwargs['column_A']}+{kwargs['column_B']}"
    return config["type"]


def load_suite(name: str, suites_dir: Path = SUITES_DIR) -> dict[str, Any]:
    """The suite `schemas/gx/<name>.json` as a dict, after checking GX can build it."""
    path = _suite_path(name, suites_dir)
    return copy.deepcopy(_load_suite_file(path, path.stat().st_mtime_ns))


def read_suite(name: str, suites_dir: Path = SUITES_DIR) -> dict[str, Any]:
    """The suite as a dict, checked as JSON but not by GX (no GX import: for reading which
    columns it names, or fingerprinting it)."""
    path = _suite_path(name, suites_dir)
    return copy.deepcopy(_read_suite_file(path, path.stat().st_mtime_ns))


def _suite_path(name: str, suites_dir: Path) -> Path:
    path = Path(suites_dir) / f"{name}.json"
    if not path.is_file():
        raise SuiteError(f"expectation suite {path} not found (suites live in {suites_dir})")
    return path


@functools.lru_cache(maxsize=16)
def _read_suite_file(path: Path, mtime_ns: int) -> dict[str, Any]:
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path} is not valid JSON: {exc}") from exc
    names = [expectation_name(e) for e in suite.get("expectations", [])]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SuiteError(f"{path}: expectations must be unique per type and column (quarantine reasons "
                         f"name them); repeated: {', '.join(repeated)}")
    return suite


@functools.lru_cache(maxsize=16)
def _load_suite_file(path: Path, mtime_ns: int) -> dict[str, Any]:
    # Cached per file version: building GX's expectation objects to check a suite is not free,
    # and a stage reads its suite more than once.
    suite = _read_suite_file(path, mtime_ns)
    _import_gx()
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    # One by one: ExpectationSuite() logs and drops an expectation it cannot build.
    for config in _gx_suite_kwargs(suite)["expectations"]:
        try:
            ExpectationConfiguration(**config).to_domain_obj()
        except Exception as exc:  # GX raises several unrelated types for a bad configuration
            raise SuiteError(f"{path}: Great Expectations cannot build {expectation_name(config)}: {exc}") from exc
    return suite


def _gx_suite_kwargs(suite: dict[str, Any]) -> dict[str, Any]:
    keep = ("type", "kwargs", "meta", "notes", "severity", "description")
    return {"name": suite["name"], "meta": suite.get("meta", {}),
            "expectations": [{k: copy.deepcopy(e[k]) for k in keep if k in e} for e in suite["expectations"]]}


def resolve_parameters(value: Any, parameters: dict[str, Any], where: str = "") -> Any:
    """`value` with every `{"$PARAMETER": name}` replaced by `parameters[name]`."""
    if isinstance(value, dict):
        if set(value) == {PARAMETER}:
            name = value[PARAMETER]
            if name not in parameters:
                raise SuiteError(f"{where or 'suite'} needs parameter {name!r}, which was not given")
            return parameters[name]
        return {k: resolve_parameters(v, parameters, where) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_parameters(v, parameters, where) for v in value]
    return value


# Expectations about the frame's whole column list: a suite with one of them is validated on
# every column of the frame, not only on those it names.
_WHOLE_FRAME_TYPES = {"expect_table_column_count_to_be_between", "expect_table_column_count_to_equal",
                      "expect_table_columns_to_match_ordered_list"}


def columns_read(suite: dict[str, Any]) -> list[str] | None:
    """Every column the suite's expectations name, in suite order; None when the suite needs
    the frame's whole column list (an exact column-set match, a column count, an ordered
    column list, a row condition, a column list given as a parameter)."""
    names: list[str] = []
    for config in suite["expectations"]:
        kwargs = config.get("kwargs", {})
        if (config["type"] in _WHOLE_FRAME_TYPES or "row_condition" in kwargs
                or (config["type"] == "expect_table_columns_to_match_set" and kwargs.get("exact_match", True))):
            return None
        for key in ("column", "column_A", "column_B"):
            if key in kwargs:
                names.append(kwargs[key])
        for key in ("column_list", "column_set"):
            if key in kwargs:
                if not isinstance(kwargs[key], list):
                    return None
                names.extend(kwargs[key])
    return list(dict.fromkeys(names))


def severity_of(config: dict[str, Any]) -> str:
    return str(config.get("severity", CRITICAL)).lower()


def row_checks(suite: dict[str, Any], parameters: dict[str, Any], columns: list[str]) -> list[RowCheck]:
    """Spark conditions for the suite's critical row-level expectations, in suite order.

    An expectation whose column is missing from the frame is skipped here: GX fails it
    (and the table-columns expectation), which stops the run at the batch level.
    """
    checks = []
    for config in suite["expectations"]:
        if not is_row_level(config) or severity_of(config) != CRITICAL:
            continue
        name = expectation_name(config)
        kwargs = resolve_parameters(config["kwargs"], parameters, name)
        if any(c not in columns for c in checked_columns(kwargs)):
            continue
        checks.append(row_check(name, config["type"], kwargs, columns, (config.get("meta") or {}).get("keep_first_by")))
    return checks


# ---------------------------------------------------------------------------------------
# running GX on Spark, with Data Docs
# ---------------------------------------------------------------------------------------

_GX_IMPORT = threading.Lock()


def _import_gx():
    # GX logs every metric it could not compute at WARNING, which drowns the CLI output;
    # its results carry the same information.
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    # One thread at a time (stages are validated side by side): two threads importing GX's
    # circularly-importing packages at once can see each other's half-initialised modules.
    with _GX_IMPORT:
        import great_expectations  # noqa: F401  (first import takes seconds: do it once, here)

        _skip_unrequested_failing_values()
        _stable_metric_bundles()
        _serial_suite_parameters()


@functools.cache
def _stable_metric_bundles() -> bool:
    """Make GX's bundled Spark aggregate the same query every time a suite runs.

    GX computes a dependency level's aggregate metrics in one `df.agg(...)`, in the order of
    a collection of metric configurations that changes from run to run. Spark generates and
    compiles (Janino) new code for every aggregate order it has not seen, and the JVM then
    JIT-compiles that class again: 0.1-0.3 s of JVM time per validation on the sample catalog,
    in a process that validates every night (the pipeline, the bench). Sorted by metric id,
    the aggregate reads the same every run and Spark reuses its compiled code. Results are
    keyed by metric id, so the order changes nothing else.
    """
    try:
        from great_expectations.execution_engine.sparkdf_execution_engine import (
            SparkDFExecutionEngine,
        )
        original = SparkDFExecutionEngine.__dict__["resolve_metric_bundle"]
    except (ImportError, KeyError):
        return False
    if getattr(original, "_catalog_index_patched", False):
        return True

    def resolve_metric_bundle(self, metric_fn_bundle, *args, **kwargs):
        ordered = sorted(metric_fn_bundle, key=lambda c: str(c.metric_configuration.id))
        return original(self, ordered, *args, **kwargs)

    functools.update_wrapper(resolve_metric_bundle, original)
    resolve_metric_bundle._catalog_index_patched = True
    SparkDFExecutionEngine.resolve_metric_bundle = resolve_metric_bundle
    return True


@functools.cache
def _serial_suite_parameters() -> None:
    """Resolve `$PARAMETER`s one thread at a time. GX parses them with one module-level parser
    (`suite_parameters.EXPR`: a shared stack, pyparsing parse actions whose arity is found on first
    call), so the manifest and images suites validated side by side could take each other's values
    or fail with "push_first() missing 1 required positional argument" (seen by tests/test_kill_resume and
    by `make run` in a fresh clone; 45 to 2,292 of 2,400 parses wrong with 8 threads, run to run)."""
    from great_expectations.core import suite_parameters

    original, lock = suite_parameters.parse_suite_parameter, threading.Lock()

    def parse_suite_parameter(*args, **kwargs):
        with lock:
            return original(*args, **kwargs)

    suite_parameters.parse_suite_parameter = functools.update_wrapper(parse_suite_parameter, original)


_PARTIAL_VALUES_SUFFIX = ".unexpected_values"


@functools.cache
def _skip_unrequested_failing_values() -> bool:
    """Stop GX from querying failing values nobody asked for.

    A map expectation (every row-level one) with result format BASIC or SUMMARY asks for the
    metric `<condition>.unexpected_values` even when `partial_unexpected_count` is 0. On Spark
    that metric is its own query per expectation (filter, select, `limit(0)`, collect): about
    half of a suite's time, for a list GX then cuts to zero items. This drops that dependency
    when the count is 0, and only then; counts, observed values and success are unchanged
    (the result has no `partial_unexpected_list` key instead of an empty one). Applied once,
    to GX's three map-expectation base classes; if GX renames them, nothing is patched and
    validation is only slower (`tests/test_validate.py` checks the patch is in place).
    """
    try:
        from great_expectations.expectations import expectation as gx_expectation

        bases = [gx_expectation.ColumnMapExpectation, gx_expectation.ColumnPairMapExpectation,
                 gx_expectation.MulticolumnMapExpectation]
        originals = [base.__dict__["get_validation_dependencies"] for base in bases]
    except (ImportError, AttributeError, KeyError):
        return False
    for base, original in zip(bases, originals):
        if getattr(original, "_catalog_index_patched", False):
            continue

        def get_validation_dependencies(self, execution_engine=None, runtime_configuration=None, *args,
                                        _original=original, **kwargs):
            dependencies = _original(self, execution_engine, runtime_configuration, *args, **kwargs)
            if (dependencies.result_format or {}).get("partial_unexpected_count") == 0:
                for name in dependencies.get_metric_names():
                    if name.endswith(_PARTIAL_VALUES_SUFFIX):
                        dependencies.remove_metric_configuration(name)
            return dependencies

        functools.update_wrapper(get_validation_dependencies, original)
        get_validation_dependencies._catalog_index_patched = True
        base.get_validation_dependencies = get_validation_dependencies
    return True


def _jinja_bytecode_cache():
    """Data Docs compile ~100 Jinja templates per page build, which is most of its time;
    a bytecode cache shared by every view (and every process of this user) removes that."""
    global _BYTECODE_CACHE
    if _BYTECODE_CACHE is None:
        import jinja2

        _BYTECODE_CACHE = jinja2.FileSystemBytecodeCache()
    return _BYTECODE_CACHE


_BYTECODE_CACHE = None


@functools.cache
def _cached_view(base_name: str):
    """GX's Jinja view class `base_name`, with the shared bytecode cache."""
    from great_expectations.render.view import view

    class View(getattr(view, base_name)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.env.bytecode_cache = _jinja_bytecode_cache()

    View.__name__ = View.__qualname__ = f"Cached{base_name}"
    return View


def __getattr__(name: str):
    # Views are built on first use so that importing this module does not import GX; GX's
    # site builder looks them up by module and class name from the site config.
    if name in ("CachedDefaultJinjaPageView", "CachedDefaultJinjaIndexPageView"):
        return _cached_view(name.removeprefix("Cached"))
    raise AttributeError(name)


def _docs_site_config(docs_dir: Path) -> dict[str, Any]:
    page_view = {"module_name": __name__, "class_name": "CachedDefaultJinjaPageView"}
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                               "view": {"module_name": __name__, "class_name": "CachedDefaultJinjaIndexPageView"}},
        "site_section_builders": {"expectations": {"view": page_view}, "validations": {"view": page_view},
                                  "profiling": "None"},
    }


@dataclass
class ExpectationOutcome:
    """One expectation's GX result, in plain JSON-able form."""

    name: str
    type: str
    kwargs: dict[str, Any]          # parameters resolved
    severity: str
    row_level: bool
    success: bool
    result: dict[str, Any]          # GX's result dict (counts, observed_value, partial lists)
    exception: str | None = None

    @property
    def observed(self) -> Any:
        if "observed_value" in self.result:
            return self.result["observed_value"]
        if "unexpected_count" in self.result:
            return {"unexpected_count": self.result["unexpected_count"],
                    "element_count": self.result.get("element_count")}
        return self.exception or "no result"

    def to_dict(self) -> dict[str, Any]:
        return {"expectation": self.name, "type": self.type, "kwargs": self.kwargs, "severity": self.severity,
                "row_level": self.row_level, "success": self.success, "result": self.result,
                "exception": self.exception}


def _ephemeral_context(docs_dir: Path | None):
    """A fresh in-memory GX context (with a Data Docs site writing into `docs_dir`): nothing
    from another validation can leak in (GX caches metrics per batch id, and a dataframe
    asset's batch id does not change with the dataframe). Creating one takes ~10 ms."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {_DOCS_SITE: _docs_site_config(docs_dir)} if docs_dir is not None else {}
    return gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False), data_docs_sites=sites,
        progress_bars=ProgressBarsConfig(globally=False), analytics_enabled=False))


def run_suite(df, suite: dict[str, Any], parameters: dict[str, Any], *, run_name: str, docs_dir: Path | None,
              asset_name: str | None = None, result_format: str = "BASIC",
              sample_failing_values: int = 0, timings: dict[str, float] | None = None) -> list[ExpectationOutcome]:
    """Validate Spark DataFrame `df` against `suite` with GX; build Data Docs into `docs_dir`.

    The suite runs on a whole-dataframe batch of GX's Spark datasource (`Batch.validate`, in
    an ephemeral context); GX computes its metrics in Spark, bundling the aggregate ones into
    one query per dependency level. The result is stored in the context's validation results
    store and the Data Docs site is built for this result and its suite only (what a
    Checkpoint's UpdateDataDocsAction does, without the Checkpoint's bookkeeping: freshness
    checks and config serialisation cost more than the validation of a small table). Results
    come back in suite order. `sample_failing_values` > 0 adds that many failing values per
    expectation to the results, at the price of one more Spark query per row-level expectation.
    `timings`, when given, receives the seconds spent validating and building Data Docs.
    """
    started = time.perf_counter()
    _import_gx()
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    context = _ephemeral_context(docs_dir)
    # persist=False: whether the frame is worth caching is the caller's call (pipelines.validate).
    batch_definition = (context.data_sources.add_spark("warehouse", persist=False)
                        .add_dataframe_asset(asset_name or suite["name"])
                        .add_batch_definition_whole_dataframe("whole_table"))
    gx_suite = gx.ExpectationSuite(**_gx_suite_kwargs(suite))
    if docs_dir is not None:
        gx_suite = context.suites.add(gx_suite)  # the Data Docs site renders the suite's page too
    batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
    validation = batch.validate(gx_suite, expectation_parameters=parameters,
                                result_format={"result_format": result_format,
                                               "partial_unexpected_count": sample_failing_values})
    run_id = RunIdentifier(run_name=run_name)
    # What ValidationDefinition.run records; Data Docs show it.
    validation.meta.update({"run_id": run_id, "validation_time": run_id.run_time,
                            "batch_parameters": {"dataframe": "<DATAFRAME>"}})
    validated = time.perf_counter()
    if docs_dir is not None:
        suite_id = ExpectationSuiteIdentifier(name=gx_suite.name)
        result_id = ValidationResultIdentifier(expectation_suite_identifier=suite_id, run_id=run_id,
                                               batch_identifier=validation.batch_id)
        context.validation_results_store.set(result_id, validation)
        context.build_data_docs(site_names=[_DOCS_SITE], resource_identifiers=[result_id, suite_id])
    if timings is not None:
        timings["expectations"] = round(validated - started, 3)
        timings["data_docs"] = round(time.perf_counter() - validated, 3)
    by_name = {}
    for item in validation.results:
        config = item.expectation_config
        as_dict = {"type": config.type, "kwargs": dict(config.kwargs)}
        info = item.exception_info or {}
        by_name[expectation_name(as_dict)] = (item, info.get("exception_message") if info.get("raised_exception") else None)
    outcomes = []
    for config in suite["expectations"]:
        name = expectation_name(config)
        item, exception = by_name.get(name, (None, "Great Expectations returned no result for this expectation"))
        outcomes.append(ExpectationOutcome(
            name=name, type=config["type"], kwargs=_json_safe(resolve_parameters(config["kwargs"], parameters, name)),
            severity=severity_of(config), row_level=is_row_level(config),
            success=bool(item is not None and item.success),  # no result counts as a failure, never a pass
            result=_json_safe(item.to_json_dict().get("result") or {}) if item is not None else {},
            exception=exception))
    return outcomes


def _json_safe(value: Any) -> Any:
    """GX results as strict JSON: numpy/Spark types converted, NaN and inf as null."""
    from great_expectations.util import convert_to_json_serializable

    return _finite_or_none(convert_to_json_serializable(value))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def docs_index(docs_dir: Path) -> Path:
    return Path(docs_dir) / "index.html"


def upload_folder(local_dir: Path, storage, prefix: str) -> list[str]:
    """Copy a local folder (a built Data Docs site) under a warehouse prefix."""
    keys = []
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            key = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
            storage.upload_file(path, key)
            keys.append(key)
    return keys
