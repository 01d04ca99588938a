"""Where a store lives: a local path, or an fsspec URL (``s3://``, ``gs://``, ``file://``, ...).

Only the driver writes a store (workers return partial sums), so a store's place needs the
handful of file operations below and a Zarr store object. Local paths use ``pathlib`` and
``os`` (atomic renames, exclusive hard links); URLs use the fsspec filesystem of their scheme,
opened by zarr as a :class:`zarr.storage.FsspecStore`.

Credentials and endpoints of a URL come from the environment, as fsspec reads them: the cloud
SDK's own variables and files (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, instance roles),
and ``FSSPEC_<PROTOCOL>_<KWARG>`` variables such as ``FSSPEC_S3_ENDPOINT_URL`` for an
S3-compatible server. Nothing of them is written into a job file or a store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

#: the package each common scheme needs, for a one-line error when it is missing
SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                   "abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub"}


class LocationError(ValueError):
    """A store location that cannot be used (unknown scheme, missing fsspec backend)."""


def is_url(where: str | Path | Location) -> bool:
    return "://" in str(where) if not isinstance(where, Path) else False


class Location:
    """A store's place. ``str(location)`` is the URL as written, or the path as ``pathlib``
    writes it: the store's name in messages and in its ``config.out``."""

    def __init__(self, where: str | Path):
        self.url = str(where)
        self.local: Path | None = None
        if not is_url(self.url):
            self.local = Path(where)
            self.url = str(self.local)  # as Path writes it: ./x.zarr/ is x.zarr
            return
        scheme = self.url.split("://", 1)[0]
        try:
            import fsspec

            # file:// writes need their folders made; other file systems have no folders
            opts = {"auto_mkdir": True} if scheme in ("file", "local") else {}
            self.fs, self.path = fsspec.url_to_fs(self.url, **opts)
        except ImportError as exc:
            package = SCHEME_PACKAGES.get(scheme, exc.name or "its fsspec backend")
            raise LocationError(f"{self.url}: {scheme}:// needs the {package} package "
                                f"(pip install {package})") from None
        except ValueError as exc:  # fsspec: unknown protocol
            raise LocationError(f"{self.url}: {exc}") from None
        self.options = opts
        self.path = self.path.rstrip("/")

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        return where if isinstance(where, Location) else cls(where)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def name(self) -> str:
        return self.local.name if self.local is not None else self.path.rsplit("/", 1)[-1]

    def sibling(self, name: str) -> Location:
        """The place ``name`` beside this one (the lock file beside a store)."""
        if self.local is not None:
            return Location(self.local.with_name(name))
        return Location(self.url.rstrip("/").rsplit("/", 1)[0] + "/" + name)

    def child(self, name: str) -> Location:
        if self.local is not None:
            return Location(self.local / name)
        return Location(self.url.rstrip("/") + "/" + name)

    # --- questions -----------------------------------------------------------------------

    def exists(self) -> bool:
        return self.local.exists() if self.local is not None else bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        if self.local is not None:
            return self.local.is_dir()
        return bool(self.fs.isdir(self.path))

    def is_file(self) -> bool:
        if self.local is not None:
            return self.local.is_file()
        return bool(self.fs.isfile(self.path))

    def has_entries(self) -> bool:
        """A folder (or object prefix) with something in it."""
        if self.local is not None:
            return self.local.is_dir() and any(self.local.iterdir())
        try:
            return bool(self.fs.ls(self.path, detail=False)) and self.is_dir()
        except FileNotFoundError:
            return False

    def blocking_parent(self) -> str | None:
        """A parent that exists and is a file (writing below it must fail), else None. Object
        stores have no such parents."""
        if self.local is None:
            return None
        for parent in self.local.parents:
            if parent.exists():
                return None if parent.is_dir() else str(parent)
        return None

    # --- zarr --------------------------------------------------------------------------------

    def zarr_store(self, read_only: bool = False) -> Any:
        """What ``zarr.open_group(store=...)`` takes for this place."""
        if self.local is not None:
            return str(self.local)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=dict(self.options),
                                    read_only=read_only)

    # --- changes -----------------------------------------------------------------------------

    def make_parent(self) -> None:
        if self.local is not None:
            self.local.parent.mkdir(parents=True, exist_ok=True)

    def remove_tree(self) -> None:
        if self.local is not None:
            shutil.rmtree(self.local)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path, recursive=True)

    def read_text(self) -> str:
        """The file's text; FileNotFoundError (an OSError) when it is absent."""
        if self.local is not None:
            return self.local.read_text()
        return self.fs.cat_file(self.path).decode()

    def write_text(self, text: str, tmp_suffix: str) -> None:
        """Replace the file whole: locally write ``{name}{tmp_suffix}`` and rename it over; on
        an object store one PUT is atomic already."""
        if self.local is not None:
            tmp = self.local.with_name(f".{self.local.name}.{tmp_suffix}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.local)
            return
        self.fs.pipe_file(self.path, text.encode())

    def create_exclusive(self, text: str, tmp_suffix: str) -> bool:
        """Create the file with ``text`` only if it does not exist; False if it does.

        Locally a complete temporary file is hard-linked into place (atomic, and a reader never
        sees it half written). Elsewhere fsspec's exclusive mode ``xb`` is used (S3 conditional
        writes, for one); a file system without it gets check-then-write, whose small window is
        closed by the caller reading the file back (see :class:`ribray.store.Lease`).
        """
        if self.local is not None:
            tmp = self.local.with_name(f".{self.local.name}.{tmp_suffix}.tmp")
            tmp.write_text(text)
            try:
                os.link(tmp, self.local)
                return True
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(text.encode())
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError):  # no exclusive mode here
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, text.encode())
            return True

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local is not None:
                self.local.unlink()
            else:
                self.fs.rm_file(self.path)
