"""Failing rows, found with Spark from the same expectation configurations GX runs.

`ROW_CONDITIONS` turns each row-level expectation type into a Spark condition with GX's
semantics (value checks pass nulls, uniqueness counted as GX counts it); a type not listed is
batch-level (`is_row_level`). `find_failing_rows` evaluates every check in one query and
brings back only the failing rows (as Arrow), each with the name of the first expectation it
failed as its reason and a detail naming every failure.

This module must never collect a whole table to the driver: only failing rows come back. It
never imports Great Expectations and never reads a suite file (pipelines.validate.suites does,
and asks `row_check` for one condition at a time).
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa


@dataclass
class RowCheck:
    """A row-level expectation as a Spark condition: `unexpected` is true on a failing row."""

    name: str
    unexpected: Any             # pyspark Column (boolean; null counts as passing)
    columns: list[str]          # the columns it checks, shown in the quarantine detail
    expected: str               # what a passing value looks like, e.g. "expected >= 32"
    fails_on_null: bool = False  # not_null: a failing row's value is null, nothing to fetch

    def detail(self, values: dict[str, Any]) -> str:
        shown = " ".join(f"{c}={'null' if self.fails_on_null else _show(values.get(c))}" for c in self.columns)
        return f"{self.name}: {shown} ({self.expected})"


def _show(value: Any) -> str:
    """A value as Spark casts it to a string (the quarantine detail read the same before)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
    return str(value)


def _describe_bounds(kwargs: dict[str, Any]) -> str:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    low_op = ">" if kwargs.get("strict_min") else ">="
    high_op = "<" if kwargs.get("strict_max") else "<="
    if low is not None and high is not None:
        return f"between {low} and {high}" if low != high else f"exactly {low}"
    return f"{low_op} {low}" if low is not None else f"{high_op} {high}"


def _between(kwargs, columns):
    from pyspark.sql import functions as F

    column = F.col(kwargs["column"])
    inside = F.lit(True)
    if kwargs.get("min_value") is not None:
        low = F.lit(kwargs["min_value"])
        inside = inside & ((column > low) if kwargs.get("strict_min") else (column >= low))
    if kwargs.get("max_value") is not None:
        high = F.lit(kwargs["max_value"])
        inside = inside & ((column < high) if kwargs.get("strict_max") else (column <= high))
    # Like GX: nulls are not checked by value expectations (not_be_null is there for that).
    return column.isNotNull() & ~inside, f"expected {_describe_bounds(kwargs)}"


def _length_between(kwargs, columns):
    from pyspark.sql import functions as F

    length = F.length(F.col(kwargs["column"]))
    inside = F.lit(True)
    if kwargs.get("min_value") is not None:
        inside = inside & (length >= F.lit(kwargs["min_value"]))
    if kwargs.get("max_value") is not None:
        inside = inside & (length <= F.lit(kwargs["max_value"]))
    return F.col(kwargs["column"]).isNotNull() & ~inside, f"length expected {_describe_bounds(kwargs)}"


def _describe_set(values: list) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:8])) + (f", ... ({len(values)} values)" if len(values) > 8 else "")
    return f"{{{shown}}}"


def _in_set(kwargs, columns):
    from pyspark.sql import functions as F

    column, values = F.col(kwargs["column"]), list(kwargs["value_set"] or [])
    return column.isNotNull() & ~column.isin(values), f"expected one of {_describe_set(values)}"


def _not_in_set(kwargs, columns):
    from pyspark.sql import functions as F

    column, values = F.col(kwargs["column"]), list(kwargs["value_set"] or [])
    return column.isNotNull() & column.isin(values), f"expected none of {_describe_set(values)}"


def _match_regex(kwargs, columns):
    from pyspark.sql import functions as F

    column = F.col(kwargs["column"])
    return column.isNotNull() & ~column.rlike(kwargs["regex"]), f"expected to match {kwargs['regex']}"


def _not_match_regex(kwargs, columns):
    from pyspark.sql import functions as F

    column = F.col(kwargs["column"])
    return column.isNotNull() & column.rlike(kwargs["regex"]), f"expected not to match {kwargs['regex']}"


def _not_null(kwargs, columns):
    from pyspark.sql import functions as F

    return F.col(kwargs["column"]).isNull(), "expected a value, found null"


def _unique(kwargs, columns, keep_first_by: str | None = None):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    names = [kwargs["column"]] if "column" in kwargs else list(kwargs["column_list"])
    window = Window.partitionBy(*names)
    ignore_row_if = kwargs.get("ignore_row_if", "all_values_are_missing")
    if "column" in kwargs:
        considered = F.col(names[0]).isNotNull()   # GX skips nulls in single-column uniqueness
    elif ignore_row_if == "all_values_are_missing":  # GX's default for compound uniqueness
        considered = ~_all_null(names)
    elif ignore_row_if == "any_value_is_missing":
        considered = ~_any_null(names)
    else:
        considered = F.lit(True)
    label = names[0] if len(names) == 1 else f"({', '.join(names)})"
    if keep_first_by and keep_first_by in columns:
        # The first copy passes: the catalog keeps one row per (product, image), like the crawl.
        unexpected = considered & (F.row_number().over(window.orderBy(F.col(keep_first_by))) > 1)
        return unexpected, f"repeats an earlier row with the same {label} (first copy kept)"
    unexpected = considered & (F.count(F.lit(1)).over(window) > 1)
    return unexpected, f"{label} is not unique (every copy rejected)"


def _all_null(names):
    from pyspark.sql import functions as F

    condition = F.lit(True)
    for n in names:
        condition = condition & F.col(n).isNull()
    return condition


def _any_null(names):
    from pyspark.sql import functions as F

    condition = F.lit(False)
    for n in names:
        condition = condition | F.col(n).isNull()
    return condition


ROW_CONDITIONS: dict[str, Callable] = {
    "expect_column_values_to_not_be_null": _not_null,
    "expect_column_values_to_be_between": _between,
    "expect_column_value_lengths_to_be_between": _length_between,
    "expect_column_values_to_be_in_set": _in_set,
    "expect_column_values_to_not_be_in_set": _not_in_set,
    "expect_column_values_to_match_regex": _match_regex,
    "expect_column_values_to_not_match_regex": _not_match_regex,
    "expect_column_values_to_be_unique": _unique,
    "expect_compound_columns_to_be_unique": _unique,
}


def is_row_level(config: dict[str, Any]) -> bool:
    """Whether an expectation is row-level: its type has a Spark condition here (any other is batch-level)."""
    return config["type"] in ROW_CONDITIONS


def checked_columns(kwargs: dict[str, Any]) -> list[str]:
    """The columns a row-level expectation checks, from its kwargs."""
    if "column" in kwargs:
        return [kwargs["column"]]
    return list(kwargs.get("column_list", []))


def row_check(name: str, expectation_type: str, kwargs: dict[str, Any], columns: list[str],
              keep_first_by: str | None = None) -> RowCheck:
    """One row-level expectation as a Spark condition over a frame with `columns`: `kwargs` with
    its parameters resolved; `keep_first_by` (uniqueness only, from the suite's meta) lets the
    first copy pass. Which expectations of a suite get one is `suites.row_checks`' call."""
    builder = ROW_CONDITIONS[expectation_type]
    if builder is _unique:
        unexpected, expected = builder(kwargs, columns, keep_first_by)
    else:
        unexpected, expected = builder(kwargs, columns)
    return RowCheck(name, unexpected, checked_columns(kwargs), expected, fails_on_null=builder is _not_null)


@dataclass
class FailingRows:
    """Rows that failed at least one critical row-level expectation."""

    rows: pa.Table                      # key columns + reason (first failure) + detail (every failure)
    failures_per_expectation: dict[str, int]
    input_rows: int

    @property
    def quarantined(self) -> int:
        return self.rows.num_rows


_FLAG = "__failed_{}"


def no_failing_rows(checks: list[RowCheck], carry_columns: list[str], input_rows: int) -> FailingRows:
    """The result of `find_failing_rows` when it is known that no row fails (no Spark query)."""
    empty = pa.table({c: pa.array([], pa.string()) for c in carry_columns})
    return FailingRows(_failing_table(carry_columns, empty, []), {c.name: 0 for c in checks}, input_rows)


def find_failing_rows(df, checks: list[RowCheck], carry_columns: list[str],
                      input_rows: int | None = None) -> FailingRows:
    """Evaluate every check in one Spark query over `df`: one boolean column per check, and
    only the rows with a true one come back to the driver, with the `carry_columns` that exist
    in `df` and the values the checks looked at. The reason (first failed check) and the
    detail (every failed check, with its values) are written here, for those rows only.
    `input_rows` saves a Spark job when the caller has counted the frame already."""
    from pyspark.sql import functions as F

    input_rows = df.count() if input_rows is None else input_rows
    carry = [c for c in carry_columns if c in df.columns]
    if not checks:
        return no_failing_rows(checks, carry, input_rows)
    shown = list(dict.fromkeys(c for check in checks if not check.fails_on_null for c in check.columns))
    flags = [_FLAG.format(i) for i in range(len(checks))]
    failing = (df.select(*dict.fromkeys(carry + shown), *[check.unexpected.alias(f) for check, f in zip(checks, flags)])
               .where(functools.reduce(operator.or_, [F.col(f) for f in flags])))
    table = failing.toArrow()
    flag_values = [table.column(f).to_pylist() for f in flags]
    failed = [[check.name for check, hit in zip(checks, hits) if hit] for hits in zip(*flag_values)]
    values = table.select(shown).to_pylist() if shown else [{}] * len(failed)
    by_name = {check.name: check for check in checks}
    per_expectation = {check.name: 0 for check in checks}
    details = []
    for row, names in zip(values, failed):
        for name in names:
            per_expectation[name] += 1
        details.append("; ".join(by_name[name].detail(row) for name in names))
    return FailingRows(_failing_table(carry, table.select(carry), failed, details), per_expectation, input_rows)


def _failing_table(carry: list[str], keys: pa.Table, failed: list[list[str]], details: list[str] | None = None
                   ) -> pa.Table:
    columns = {c: keys.column(c) for c in carry}
    columns["reason"] = pa.array([names[0] for names in failed], pa.string())
    columns["detail"] = pa.array(details or [], pa.string())
    columns["failed"] = pa.array(failed, pa.list_(pa.string()))
    return pa.table(columns)
