"""Data contracts: Arrow schemas of every table that crosses a stage boundary, JSON Schemas
and Great Expectations suites. Readers validate what they read against these."""
