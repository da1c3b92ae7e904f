"""The warehouse: one small key/value interface over a local directory or an S3 bucket.

Every stage reads and writes the warehouse through `Storage`, never through Spark's
Hadoop filesystems: Spark tasks write their own part files with boto3, so the same code
runs against a laptop directory, AWS S3 or any S3-compatible store without hadoop-aws jars.
Keys are '/'-separated paths relative to the warehouse root (`runs/<id>/manifest.parquet`).

This module must never hold state that cannot be pickled into a Spark task: a Storage is
rebuilt from (uri, S3Settings) and opens its boto3 client lazily.

The module is longer than 500 lines because it holds both backends side by side (local and S3),
whose conditional writes, fsync and error mapping must keep one meaning; a third backend would be
the time to give each its own module.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import S3Settings
from pipelines.address_policy import AddressPolicy
from pipelines.errors import CatalogIndexError, UsageError
from pipelines.guarded_http import GuardedClient, HttpFailure, short


class StorageError(UsageError, RuntimeError):
    """A warehouse operation failed; the message names the URI and what to check."""


class ObjectTooLarge(StorageError):
    """An object is larger than the cap its reader set (LATEST, a manifest): at most cap + 1 bytes were read.
    `version` is the object's version tag when `read_versioned` refused it (a rollback may still replace it)."""

    def __init__(self, uri: str, cap: int, version: str | None = None):
        super().__init__(f"{uri} is larger than the cap of {cap:,} bytes")
        self.cap, self.version = cap, version


class SizeMismatch(StorageError):
    """`download_file` found an object of another size than the one expected: nothing past the expected
    size was ever written, and the local file is removed. `actual` is None when the object was seen to hold
    more than expected (it grew, or was replaced, while it was being copied)."""

    def __init__(self, uri: str, expected: int, actual: int | None):
        self.expected, self.actual = expected, actual
        self.found = f"{actual:,} bytes" if actual is not None else f"more than {expected:,} bytes"
        super().__init__(f"{uri} holds {self.found}, not the {expected:,} bytes expected: "
                         "download refused, nothing of it kept")


class WriteConflict(CatalogIndexError):
    """A conditional write found the object changed (or present, or gone) since it was read:
    someone else wrote it first. Nothing was written."""

    exit_code = 1


TEXT_MAX_BYTES = 64 << 20  # the default cap of read_text


class Storage:
    """Interface shared by LocalStorage and S3Storage."""

    uri: str

    # -- primitives each backend implements -------------------------------------------
    # `max_bytes`: read at most that many bytes (+1 to tell), else ObjectTooLarge. Whoever reads an object that
    # someone else may write (LATEST, manifests) sets it: a hostile 10 GB "manifest.json" is never read whole.
    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes: raise NotImplementedError
    def write_bytes(self, key: str, data: bytes) -> None: raise NotImplementedError
    def exists(self, key: str) -> bool: raise NotImplementedError
    def list(self, prefix: str = "") -> list[str]: raise NotImplementedError
    def list_dirs(self, prefix: str) -> list[str]: raise NotImplementedError
    def list_versions(self, prefix: str) -> dict[str, str]: raise NotImplementedError  # key -> size + change tag
    def delete(self, key: str) -> None: raise NotImplementedError
    def upload_file(self, local_path: str | os.PathLike, key: str) -> None: raise NotImplementedError
    # `expected_bytes`: the object must be exactly that size (SizeMismatch otherwise, checked before copying),
    # and no more than that is ever written to `local_path`, whatever the object turns out to hold.
    def download_file(self, key: str, local_path: str | os.PathLike,
                      expected_bytes: int | None = None) -> None: raise NotImplementedError

    # -- compare-and-swap (LATEST, manifests, leases) ----------------------------------
    def read_versioned(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str] | None:
        """(content, version tag) of one object, or None when it does not exist. The tag changes
        whenever the object is replaced; `write_if` compares against it. Beyond `max_bytes`:
        ObjectTooLarge, carrying the tag."""
        raise NotImplementedError

    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        """Write `data` only if the object still has `version` (None: only if it does not exist);
        otherwise raise WriteConflict and write nothing. Atomic against every other `write_if`."""
        raise NotImplementedError

    # -- shared helpers ---------------------------------------------------------------
    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key.lstrip('/')}"

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def read_text(self, key: str, max_bytes: int | None = None) -> str:
        """A text object (a marker, report, hold, plan: JSON), at most `max_bytes` (default TEXT_MAX_BYTES)
        else ObjectTooLarge: anyone who can write the warehouse can leave a 10 GB "report", and none of
        our text objects comes near the cap. Unbounded data goes through read_bytes/read_table."""
        return self.read_bytes(key, TEXT_MAX_BYTES if max_bytes is None else max_bytes).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def write_table(self, key: str, table: pa.Table, compression: str = "zstd") -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression=compression)
        self.write_bytes(key, sink.getvalue())

    def read_table(self, key_or_prefix: str, columns: list[str] | None = None,
                   schema: pa.Schema | None = None) -> pa.Table:
        """Read one Parquet file, or every `.parquet` file under a prefix, as one table.

        `schema` gives the result for an empty prefix and the type every part is cast to.
        """
        keys = [key_or_prefix] if key_or_prefix.endswith(".parquet") else [
            k for k in self.list(key_or_prefix) if k.endswith(".parquet")]
        tables = [self.read_parquet_file(k, columns) for k in sorted(keys)]
        if schema is not None:
            target = pa.schema([schema.field(c) for c in columns]) if columns else schema
            tables = [t.select(target.names).cast(target) for t in tables]
            if not tables:
                return target.empty_table()
        if not tables:
            raise StorageError(f"no Parquet files under {self.uri_for(key_or_prefix)}")
        return pa.concat_tables(tables)

    def read_parquet_file(self, key: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(key)), columns=columns)

    def open_input(self, key: str) -> BinaryIO:
        """A seekable read-only file over one object, for readers that need only some byte ranges
        (`pq.ParquetFile(storage.open_input(key))` fetches the footer and the column chunks it reads)."""
        return io.BytesIO(self.read_bytes(key))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the usual permissions (0644 under umask 022), not mkstemp's private 0600:
# serving teams and other users read the warehouse.
_FILE_MODE = 0o666 & ~_current_umask()


class _CappedWriter:
    """A file open for writing that refuses (SizeMismatch, writing none of it) any write reaching past
    `limit` bytes: what a download puts on disk is bounded by the size it expected, not by the object.
    Seekable, for boto3's transfer manager, which writes ranged parts at their offsets (one I/O thread)."""

    def __init__(self, handle: BinaryIO, limit: int, uri: str):
        self.handle, self.limit, self.uri, self.end = handle, limit, uri, 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def write(self, data) -> int:
        end = self.handle.tell() + len(data)
        if end > self.limit:
            raise SizeMismatch(self.uri, self.limit, None)
        self.end = max(self.end, end)
        return self.handle.write(data)


@contextmanager
def _capped_download(local_path, expected_bytes: int, uri: str) -> Iterator[_CappedWriter]:
    """`local_path` opened through a _CappedWriter; removed if the block fails or wrote other than
    `expected_bytes` (an object that shrank while it was copied)."""
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(local_path, "wb") as handle:
            writer = _CappedWriter(handle, expected_bytes, uri)
            yield writer
        if writer.end != expected_bytes:
            raise SizeMismatch(uri, expected_bytes, writer.end)
    except BaseException:
        Path(local_path).unlink(missing_ok=True)
        raise


# No object updated by compare-and-swap (LATEST, manifests, leases) comes near this size: one that does was put
# there by someone else, and is told apart by inode, size and mtime instead of read for a digest.
_DIGESTED_TAG_MAX_BYTES = 64 << 20


def _file_version(fh: BinaryIO, data: bytes | None = None) -> str:
    """The version tag of a local file (`data`: its content, when already read): its inode (a write replaces
    the file) and the sha256 of its content (the digest names the content): equal tags, same object."""
    stat = os.fstat(fh.fileno())
    if stat.st_size > _DIGESTED_TAG_MAX_BYTES:
        return f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
    if data is None:
        fh.seek(0)
        data = fh.read(_DIGESTED_TAG_MAX_BYTES + 1)
    return f"{stat.st_ino}:{hashlib.sha256(data).hexdigest()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key.lstrip("/")).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the warehouse root {self.root}")
        return path

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                return self._read_capped(fh, key, max_bytes)
        except FileNotFoundError as exc:
            raise StorageError(f"{self.uri_for(key)} does not exist") from exc

    def _read_capped(self, fh: BinaryIO, key: str, max_bytes: int | None, versioned: bool = False) -> bytes:
        if max_bytes is None:
            return fh.read()
        # The size first (no read at all), then a read of that size + 1, not of the cap: read(n) allocates
        # n bytes up front, 64 MiB for every small JSON. A file that grows meanwhile is read on, 1 MiB at
        # a time, to cap + 1 at most: never more than the cap in memory.
        def too_large() -> ObjectTooLarge:
            return ObjectTooLarge(self.uri_for(key), max_bytes, _file_version(fh) if versioned else None)

        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise too_large()
        chunks = [fh.read(size + 1)]
        read = len(chunks[0])
        while chunks[-1] and read <= max_bytes:
            chunks.append(fh.read(min(1 << 20, max_bytes + 1 - read)))
            read += len(chunks[-1])
        if read > max_bytes:
            raise too_large()
        return b"".join(chunks)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._replace(self._path(key), lambda fh: fh.write(data))

    def _replace(self, path: Path, write) -> None:
        """Write-then-rename: a reader never sees half a file, a killed writer leaves no file. The file
        and then its directory are fsynced, so that once this returns the file survives a power loss, and a
        commit marker written after its data (the rule of every stage) never names data that was lost."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                os.fchmod(fh.fileno(), _FILE_MODE)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def read_versioned(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str] | None:
        try:
            with open(self._path(key), "rb") as fh:
                data = self._read_capped(fh, key, max_bytes, versioned=True)
                return data, _file_version(fh, data)
        except FileNotFoundError:
            return None

    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        # An exclusive lock (flock: released by the kernel if the holder is killed) around read-compare-
        # rename makes this a compare-and-swap for every process on this machine; the lock file is hidden
        # from list() by its leading dot.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as fh:
                    current = _file_version(fh)  # bounded, whatever someone else put there
            except FileNotFoundError:
                current = None
            if current != version:
                raise WriteConflict(f"{self.uri_for(key)} changed since it was read "
                                    f"({'now absent' if current is None else 'replaced'}); nothing written")
            self.write_bytes(key, data)
        finally:
            os.close(lock)  # closing the descriptor releases the lock

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        # A prefix may end mid-name (like S3): list the parent and filter.
        search = base if base.is_dir() else base.parent
        if not search.is_dir():
            return []
        keys = []
        for path in search.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix.lstrip("/")):
                    keys.append(key)
        return sorted(keys)

    def list_versions(self, prefix: str) -> dict[str, str]:
        """Keys under `prefix` with their size and modification time: a changed file reads differently."""
        versions = {}
        for key in self.list(prefix):
            stat = self._path(key).stat()
            versions[key] = f"{stat.st_size}:{stat.st_mtime_ns}"
        return versions

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix)
        if path.is_dir():
            count = sum(1 for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path)
            return count
        return super().delete_prefix(prefix)

    def upload_file(self, local_path, key: str) -> None:
        # Streamed, not read into memory: shard files are GBs. Same write-then-rename as write_bytes.
        def copy(fh):
            with open(local_path, "rb") as source:
                shutil.copyfileobj(source, fh, 16 << 20)

        self._replace(self._path(key), copy)

    def open_input(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise StorageError(f"{self.uri_for(key)} does not exist") from exc

    def download_file(self, key: str, local_path, expected_bytes: int | None = None) -> None:
        if expected_bytes is None:
            Path(local_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(key), local_path)
            return
        try:
            source = open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise StorageError(f"{self.uri_for(key)} does not exist") from exc
        with source:
            size = os.fstat(source.fileno()).st_size  # the open file: a later rename cannot swap it
            if size != expected_bytes:
                raise SizeMismatch(self.uri_for(key), expected_bytes, size)
            with _capped_download(local_path, expected_bytes, self.uri_for(key)) as target:
                shutil.copyfileobj(source, target, 16 << 20)  # a file growing meanwhile stops at the cap


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str, settings: S3Settings | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings or S3Settings()
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None  # boto3 clients do not pickle; each Spark task opens its own
        return state

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(retries={"max_attempts": self.settings.max_attempts, "mode": "standard"},
                            s3={"addressing_style": "path"} if self.settings.endpoint_url else None,
                            max_pool_connections=32,
                            request_checksum_calculation=self.settings.checksums,
                            response_checksum_validation=self.settings.checksums)
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.settings.endpoint_url, region_name=self.settings.region, config=config)
        return self._client

    @property
    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        mb = 1024 * 1024
        return TransferConfig(multipart_threshold=self.settings.multipart_threshold_mb * mb,
                              multipart_chunksize=self.settings.multipart_chunk_mb * mb)

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _errors(self, action: str, key: str):
        return _S3ErrorContext(self, action, key)

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with self._errors("read", key):
            if max_bytes is not None:
                return self._get_capped(key, max_bytes)[0]
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def _get_capped(self, key: str, max_bytes: int) -> tuple[bytes, str]:
        """(content, ETag) of an object of at most `max_bytes`, else ObjectTooLarge (with the ETag). A ranged
        GET asks for max_bytes + 1 bytes; the object's full size (Content-Range, or Content-Length from a store
        that ignores ranges) refuses a larger one before its body is read, and the read itself stops there."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes=0-{max_bytes}")
        except ClientError as exc:
            if _error_code(exc) not in ("InvalidRange", "416"):
                raise
            # An empty object has no byte 0 to range over (S3 answers 416): read it plainly, still capped.
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        body, etag = response["Body"], response.get("ETag", "")
        try:
            total = (response.get("ContentRange") or "").rpartition("/")[2]  # "bytes 0-N/TOTAL" of a ranged answer
            if (int(total) if total.isdigit() else response.get("ContentLength", 0)) > max_bytes:
                raise ObjectTooLarge(self.uri_for(key), max_bytes, etag)
            data = body.read(max_bytes + 1)
        finally:
            body.close()  # unread bytes are dropped with the connection, never read
        if len(data) > max_bytes:
            raise ObjectTooLarge(self.uri_for(key), max_bytes, etag)
        return data, etag

    def write_bytes(self, key: str, data: bytes) -> None:
        # S3 PUTs are atomic per object: readers see the old object or the new one.
        with self._errors("write", key):
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer_config)

    def read_versioned(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            with self._errors("read", key):
                if max_bytes is not None:
                    return self._get_capped(key, max_bytes)
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                return response["Body"].read(), response["ETag"]
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _error_code(cause) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        """S3 conditional write: `If-Match: <ETag>` to replace, `If-None-Match: *` to create. The store
        must honour them (AWS S3 since 2024, MinIO, SeaweedFS >= 3.97); `check_conditional_writes` tells."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        try:
            with self._errors("write", key):
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except StorageError as exc:
            cause = exc.__cause__
            # 412: the condition failed; 409: a concurrent conditional write won; 404 on If-Match: deleted meanwhile.
            if isinstance(cause, ClientError) and _error_code(cause) in (
                    "PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                raise WriteConflict(f"{self.uri_for(key)} changed since it was read ({_error_code(cause)}); "
                                    "nothing written") from exc
            raise

    def check_conditional_writes(self, probe_key: str) -> None:
        """Refuse a store that silently ignores If-None-Match (it would turn every compare-and-swap into a
        blind overwrite): create a probe object twice; the second write must be refused."""
        if getattr(self, "_conditional_checked", False):
            return
        try:
            self.write_if(probe_key, b"probe", None)
        except WriteConflict:
            pass  # a first write whose answer was lost, retried by the client and refused: the probe exists
        try:
            self.write_if(probe_key, b"probe", None)
        except WriteConflict:
            self._conditional_checked = True
            return
        finally:
            self.delete(probe_key)
        raise StorageError(f"the S3 store at {self.settings.endpoint_url or 'AWS'} ignores conditional writes "
                           "(If-None-Match: *): LATEST cannot be moved safely there. Use a store that supports "
                           "them (AWS S3, MinIO, SeaweedFS >= 3.97)")

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot check {self.uri_for(key)}: {exc}") from exc

    def _paginate(self, prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        kwargs = {"Bucket": self.bucket, "Prefix": self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with self._errors("list", prefix):
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(obj["Key"][strip:] for page in self._paginate(prefix) for obj in page.get("Contents", []))

    def list_versions(self, prefix: str) -> dict[str, str]:
        """Keys under `prefix` with their size and ETag (the content's digest for a plain upload)."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        return {obj["Key"][strip:]: f"{obj['Size']}:{obj.get('ETag', '')}"
                for page in self._paginate(prefix) for obj in page.get("Contents", [])}

    def list_dirs(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/") + "/"
        names = []
        for page in self._paginate(prefix, delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.append(common["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(names)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            with self._errors("delete", prefix):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def upload_file(self, local_path, key: str) -> None:
        with self._errors("upload", key):
            self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=self._transfer_config)

    def download_file(self, key: str, local_path, expected_bytes: int | None = None) -> None:
        with self._errors("download", key):
            if expected_bytes is None:
                Path(local_path).parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, self._key(key), str(local_path), Config=self._transfer_config)
                return
            size = self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
            if size != expected_bytes:
                raise SizeMismatch(self.uri_for(key), expected_bytes, size)
            # Replaced by a larger object after the HEAD: the capped writer stops the transfer at the expected size.
            with _capped_download(local_path, expected_bytes, self.uri_for(key)) as target:
                self.client.download_fileobj(self.bucket, self._key(key), target, Config=self._transfer_config)

    def open_input(self, key: str) -> BinaryIO:
        with self._errors("read", key):
            size = self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        return _S3RangeReader(self, key, size)  # unbuffered: a Parquet reader asks for whole column chunks


class _S3RangeReader(io.RawIOBase):
    """An S3 object as a seekable file: every read is one ranged GET of the bytes asked for."""

    def __init__(self, storage: S3Storage, key: str, size: int):
        self.storage, self.key, self.size, self.position = storage, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.size, self.position + len(buffer))
        if end <= self.position:
            return 0
        with self.storage._errors("read", self.key):
            data = self.storage.client.get_object(Bucket=self.storage.bucket, Key=self.storage._key(self.key),
                                                  Range=f"bytes={self.position}-{end - 1}")["Body"].read()
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def _error_code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class _S3ErrorContext:
    """Turns botocore errors into StorageError messages that say what to check."""

    def __init__(self, storage: S3Storage, action: str, key: str):
        self.storage, self.action, self.key = storage, action, key

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, StorageError):
            return False
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        uri = self.storage.uri_for(self.key)
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"{uri} does not exist") from exc
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.storage.bucket!r} does not exist (warehouse {self.storage.uri}); "
                                   "create it or fix the warehouse URI") from exc
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"access denied to {self.action} {uri}: check AWS credentials "
                                   "(AWS_PROFILE / AWS_ACCESS_KEY_ID) and the bucket policy") from exc
            raise StorageError(f"S3 {self.action} of {uri} failed: {code}: {exc}") from exc
        if isinstance(exc, NoCredentialsError):
            raise StorageError(f"no AWS credentials found to {self.action} {uri}: set AWS_PROFILE or "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from exc
        if isinstance(exc, BotoCoreError):
            raise StorageError(f"S3 {self.action} of {uri} failed: {exc} "
                               f"(endpoint: {self.storage.settings.endpoint_url or 'AWS'})") from exc
        return False


def open_storage(uri: str, s3: S3Settings | None = None) -> Storage:
    """Open a warehouse from `file:///path`, a plain path, or `s3://bucket/prefix`."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names a host; use file:///absolute/path")
        return LocalStorage(path)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"S3 URI {uri!r} has no bucket; use s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path, s3)
    raise StorageError(f"unsupported warehouse URI {uri!r}: use file:///path or s3://bucket/prefix")


DEFAULT_URI_MAX_BYTES = 64_000_000


def read_uri_bytes(uri: str, s3: S3Settings | None = None, timeout_s: float = 60.0, *,
                   max_bytes: int = DEFAULT_URI_MAX_BYTES, policy: AddressPolicy | None = None) -> bytes:
    """Read one whole object named by a URI: a local path, file://, http(s):// or s3://.

    Whatever the source, at most `max_bytes` are read (StorageError beyond). http(s):// goes
    through pipelines.guarded_http: `policy` (default: public addresses only) is checked on
    every connection and redirect hop, and the whole download, redirects included, has
    `timeout_s` (a wall-clock deadline, not a per-read timeout)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        client = GuardedClient(policy or AddressPolicy(), connect_timeout_s=min(10.0, timeout_s),
                               read_timeout_s=min(30.0, timeout_s), maxsize=1)
        try:
            return client.get_bytes(uri, max_bytes=max_bytes, timeout_s=timeout_s)
        except HttpFailure as exc:
            raise StorageError(f"GET {short(uri)} failed: {exc.reason}: {exc.detail}") from exc
        finally:
            client.close()
    if parsed.scheme in ("s3", "s3a"):
        bucket_prefix, _, name = parsed.path.rpartition("/")
        storage = S3Storage(parsed.netloc, bucket_prefix, s3)
        with storage._errors("read", name):
            body = storage.client.get_object(Bucket=storage.bucket, Key=storage._key(name))["Body"]
            try:
                data = body.read(max_bytes + 1)  # never more than the cap in memory, whatever the object's size
            finally:
                body.close()
    elif parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
        if not path.is_file():
            raise StorageError(f"{path} does not exist")
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    else:
        raise StorageError(f"unsupported URI scheme in {short(uri)!r} (use a path, file://, http(s):// or s3://)")
    if len(data) > max_bytes:
        raise StorageError(f"{short(uri)} is larger than the cap of {max_bytes:,} bytes")
    return data
