"""Settings precedence: defaults < YAML file < env vars < flags; errors name the setting."""
import pytest

from pipelines.config import ConfigError, load_settings


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yml"
    cfg.write_text("warehouse: s3://from-file/wh\ncrawl:\n  retries: 7\n  concurrency: 3\n"
                   "s3:\n  endpoint_url: http://127.0.0.1:9000\n")
    assert load_settings(cfg).crawl.retries == 7
    monkeypatch.setenv("CATALOG_INDEX_CRAWL__RETRIES", "5")
    monkeypatch.setenv("CATALOG_INDEX_CRAWL__ALLOW_NETWORKS", '["10.0.0.0/8"]')
    settings = load_settings(cfg, crawl={"concurrency": 9, "max_bytes": None})
    assert settings.warehouse == "s3://from-file/wh"           # file
    assert settings.crawl.retries == 5                          # env beats file
    assert settings.crawl.concurrency == 9                      # flag beats file
    assert settings.crawl.max_bytes == 25_000_000               # unset flag keeps the default
    assert settings.crawl.allow_networks == ["10.0.0.0/8"]
    assert settings.s3.endpoint_url == "http://127.0.0.1:9000"


def test_config_file_from_env(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yml"
    cfg.write_text("spark:\n  master: local[1]\n")
    monkeypatch.setenv("CATALOG_INDEX_CONFIG", str(cfg))
    assert load_settings().spark.master == "local[1]"


def test_errors_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("CATALOG_INDEX_CRAWL__RETRIES", "lots")
    with pytest.raises(ConfigError, match="crawl.retries"):
        load_settings()
    monkeypatch.delenv("CATALOG_INDEX_CRAWL__RETRIES")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("crawl:\n  retrys: 3\n")
    with pytest.raises(ConfigError, match="crawl.retrys"):
        load_settings(bad)


def test_dedup_defaults_are_the_tuned_constants():
    from pipelines.dedup.confirmation import CONFIRMATION_THRESHOLD
    from pipelines.dedup.near_duplicates import CANDIDATE_MAX_DISTANCE

    dedup = load_settings().dedup
    assert (dedup.max_distance, dedup.confirm_threshold) == (CANDIDATE_MAX_DISTANCE, CONFIRMATION_THRESHOLD)


def test_spark_profile_java_options_reach_the_jvm_with_the_log4j_configuration(spark):
    """local.conf's JIT flag and the quiet log4j configuration both reach the session's JVM: a
    profile that sets Java options must not lose the log4j file (Spark's INFO chatter would
    flood the terminal), and a user's own log4j option wins over ours."""
    from pipelines.spark import INFRA_SPARK, session_conf

    jvm_args = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    assert "-XX:TieredStopAtLevel=1" in jvm_args
    assert f"-Dlog4j.configurationFile=file:{INFRA_SPARK / 'log4j2.properties'}" in jvm_args

    mine = "-Dlog4j.configurationFile=file:/etc/mine.properties"
    conf = session_conf(load_settings(spark={"conf": {"spark.driver.extraJavaOptions": f"-Xss4m {mine}"}}))
    assert conf["spark.driver.extraJavaOptions"] == f"-Xss4m {mine}"
    assert "log4j2.properties" in conf["spark.executor.extraJavaOptions"]
    assert session_conf(load_settings(spark={"conf": {"a": "b"}}), under_submit=True) == {"a": "b"}
