"""The model lifecycle: which versions are served, hot reload, explicit load and unload.

`ModelManager` keeps the registry in line with the repository on disk and the server's version
policy: at start-up, on every poll (`poll_interval_s`), and on RepositoryModelLoad/Unload.

Hot reload: a new version (the trainer renames a complete `.tmp-*` folder into place) is loaded
beside the one being served, in a worker thread; it is started and added to the registry in one
step on the event loop, which switches new requests to it; then the old version leaves the
registry and its batcher closes, which computes what was queued for it before it goes. A
request that picked the old version just before the switch is sent on to the new one
(ModelRegistry.predict), so a reload fails no request.

A version that fails to load is remembered (by its folder's identity and times) and not tried
again on every poll; it is retried when it changes, or on an explicit load.
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from snapserve.server.batcher import BatcherConfig
from snapserve.server.ensemble import load_version
from snapserve.server.errors import (ConfigError, InvalidModelName, ModelLoadError, ModelNotFound,
                           NoLoadableVersion)
from snapserve.server.health import HealthServicer
from snapserve.server.manifest import MODEL_NAME
from snapserve.server.metrics import ServerMetrics
from snapserve.server.registry import ModelRegistry, scan_repository
from snapserve.server.runtime import RuntimeConfig

__all__ = ["VERSION_POLICIES", "IndexEntry", "ModelManager", "RepositoryConfig",
           "check_model_name"]

logger = logging.getLogger(__name__)

VERSION_POLICIES = ("latest", "all", "specific")
MAX_MODEL_NAME = 255  # one path component on common file systems


@dataclass(frozen=True)
class RepositoryConfig:
    # latest: the newest loadable version of each model; all: every loadable version (requests
    # without a version get the newest); specific: only the versions in `pinned`, and models
    # without a pin are not served.
    version_policy: str = "latest"
    # Model name -> the versions to serve, with version_policy "specific" (CLI: --pin digits=2).
    pinned: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Seconds between scans for new, broken or removed versions. 0: the repository is read at
    # start-up and on RepositoryModelLoad only. A scan lists folders; it reads no model file
    # unless something changed, so a few seconds costs little.
    poll_interval_s: float = 0.0
    # RepositoryModelLoad / RepositoryModelUnload. Off by default: they let any client that
    # reaches the port change what is served.
    allow_repository_control: bool = False

    def __post_init__(self) -> None:
        if self.version_policy not in VERSION_POLICIES:
            raise ConfigError(f"version_policy must be one of {', '.join(VERSION_POLICIES)}, "
                              f"got {self.version_policy!r}")
        pinned = {}
        for name, versions in dict(self.pinned).items():
            try:
                check_model_name(name, "pinned")
            except InvalidModelName as exc:
                raise ConfigError(str(exc)) from None
            versions = tuple(sorted(set(versions)))
            if not versions or not all(isinstance(v, int) and v >= 1 for v in versions):
                raise ConfigError(f"pinned[{name!r}] must list versions >= 1, got {versions!r}")
            pinned[name] = versions
        object.__setattr__(self, "pinned", pinned)
        if pinned and self.version_policy != "specific":
            raise ConfigError(f"pinned versions need version_policy 'specific', not "
                              f"{self.version_policy!r}")
        if self.version_policy == "specific" and not pinned:
            raise ConfigError("version_policy 'specific' needs pinned versions (--pin MODEL=V)")
        if not (self.poll_interval_s >= 0 and math.isfinite(self.poll_interval_s)):
            raise ConfigError(f"poll_interval_s must be a number >= 0, "
                              f"got {self.poll_interval_s!r}")


def check_model_name(name: str, field: str = "model_name") -> str:
    """`name` if it is a plain model name; InvalidModelName otherwise (``, `..`, `a/b`, ...)."""
    if not isinstance(name, str) or len(name) > MAX_MODEL_NAME or not MODEL_NAME.fullmatch(name):
        raise InvalidModelName(
            f"{field} {name!r} is not a model name: expected letters, digits, '_', '.', '-', "
            f"starting with a letter or digit, at most {MAX_MODEL_NAME} characters")
    return name


@dataclass(frozen=True)
class IndexEntry:
    """One model version of the repository, as RepositoryIndex reports it."""

    name: str
    version: int
    state: str  # READY, LOADING, UNAVAILABLE
    reason: str = ""


def _identity(path: Path) -> tuple[int, ...]:
    """Changes when a version folder is replaced or its manifest rewritten."""
    folder = path.stat()
    try:
        manifest = (path / "manifest.json").stat()
    except FileNotFoundError:
        return (folder.st_ino, folder.st_mtime_ns)
    return (folder.st_ino, folder.st_mtime_ns, manifest.st_mtime_ns, manifest.st_size)


class ModelManager:
    """Loads, switches and unloads model versions; one change at a time (`_lock`)."""

    def __init__(self, root: Path, config: RepositoryConfig, runtime_config: RuntimeConfig,
                 batcher_config: BatcherConfig, executor: Executor, registry: ModelRegistry,
                 health: HealthServicer, metrics: ServerMetrics) -> None:
        self.root = root
        self.config = config
        self.registry = registry
        self._runtime_config = runtime_config
        self._batcher_config = batcher_config
        self._executor = executor  # where loaded versions run inference
        self._health = health
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._failed: dict[tuple[str, int], tuple[tuple[int, ...], str]] = {}
        self._loading: set[tuple[str, int]] = set()
        self._unloaded: set[str] = set()  # unloaded by request: polls leave them alone
        self._known: set[str] = set()     # models seen on disk, for health and removals
        self._poller: asyncio.Task[None] | None = None
        registry.refusal_reasons = self.refusal_reasons

    # -- scanning and syncing -------------------------------------------------------------

    async def _scan(self, warn: bool = False) -> dict[str, dict[int, Path]]:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, scan_repository, self.root, warn)
        return {name: {int(p.name): p for p in dirs} for name, dirs in found.items()}

    async def load_all(self) -> None:
        """The start-up load: every model of the repository, as the policy says."""
        await self.poll_once(warn=True)

    async def poll_once(self, warn: bool = False) -> None:
        """Bring the registry in line with the repository now (what each poll does)."""
        async with self._lock:
            on_disk = await self._scan(warn)
            for name, versions in on_disk.items():
                if warn and not self._wanted(name, versions):
                    logger.warning("model %s: none of its versions %s is pinned; not serving it "
                                   "(version policy specific)", name, sorted(versions))
                if name not in self._unloaded:
                    await self._sync_model(name, versions)
            for name in sorted(self._known - on_disk.keys()):
                await self._remove_model(name)

    def refusal_reasons(self, name: str) -> dict[int, str]:
        """Why versions of `name` were refused at load, by version (until one loads again)."""
        return {v: reason for (n, v), (_, reason) in list(self._failed.items()) if n == name}

    def start_polling(self) -> None:
        if self.config.poll_interval_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(),
                                                                  name="repository-poller")

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a bad moment on disk must not end polling
                logger.exception("polling %s failed; trying again in %.1fs",
                                 self.root, self.config.poll_interval_s)

    def _wanted(self, name: str, on_disk: Mapping[int, Path]) -> list[int]:
        """Versions to serve, newest first; with `latest`, the first loadable one of them."""
        if self.config.version_policy == "specific":
            return sorted(set(self.config.pinned.get(name, ())) & on_disk.keys(), reverse=True)
        return sorted(on_disk, reverse=True)

    async def _sync_model(self, name: str, on_disk: Mapping[int, Path]) -> None:
        self._known.add(name)
        loaded = set(self.registry.versions(name)) if name in self.registry else set()
        if not loaded:
            self._health.set(name, False)  # NOT_SERVING while its first version loads
        serve: list[int] = []
        for version in self._wanted(name, on_disk):
            if version in loaded or await self._load(name, version, on_disk[version]):
                serve.append(version)
                if self.config.version_policy == "latest":
                    break
        for version in sorted(loaded - set(serve)):
            await self._unload(name, version)
        self._health.set(name, bool(serve))

    async def _load(self, name: str, version: int, path: Path) -> bool:
        """Load, start and register one version; False (logged once) if it cannot be served."""
        key = (name, version)
        try:
            identity = _identity(path)
        except FileNotFoundError:  # removed since the scan
            return False
        if key in self._failed and self._failed[key][0] == identity:
            return False  # refused before, unchanged since: no log line on every poll
        loop = asyncio.get_running_loop()
        self._loading.add(key)
        try:
            served = await loop.run_in_executor(None, load_version, path, self._runtime_config,
                                                 self._batcher_config, self._executor)
        except ModelLoadError as exc:
            reason, label = str(exc), exc.reason
            logger.error("refusing model %s version %d: %s", name, version, reason)
        except Exception as exc:  # a bug or an OS error must not take the other models down
            reason, label = f"unexpected error: {exc!r}", "unexpected"
            logger.exception("refusing model %s version %d: unexpected error", name, version)
        else:
            served.observers.append(self._metrics.observer(name, version))
            await served.start()
            self.registry.add(served)  # from here, requests without a version get the newest
            self._failed.pop(key, None)
            logger.info("loaded model %s version %d: %d members, method %s, on %s",
                        name, version, served.runtime.members, served.manifest.method or "?",
                        served.runtime.provider)
            return True
        finally:
            self._loading.discard(key)
        self._failed[key] = (identity, reason)
        self._metrics.load_failures.labels(name, label).inc()
        return False

    async def _unload(self, name: str, version: int) -> None:
        served = self.registry.remove(name, version)  # new requests no longer see it
        logger.info("unloading model %s version %d once its queued requests are answered",
                    name, version)
        await served.close()
        self._metrics.forget(name, version)
        logger.info("unloaded model %s version %d", name, version)

    async def _remove_model(self, name: str) -> None:
        logger.warning("model %s left the repository; no longer serving it", name)
        for version in self.registry.versions(name) if name in self.registry else []:
            await self._unload(name, version)
        self._known.discard(name)
        self._unloaded.discard(name)
        self._failed = {k: v for k, v in self._failed.items() if k[0] != name}
        self._health.forget(name)

    # -- explicit control (RepositoryModelLoad / RepositoryModelUnload) -------------------------

    async def load_model(self, name: str) -> None:
        """Load (or reload) a model as the policy says, retrying versions that failed before.
        ModelNotFound if the repository has no version of it; NoLoadableVersion if none loads."""
        check_model_name(name)
        async with self._lock:
            on_disk = (await self._scan()).get(name)
            if not on_disk:
                raise ModelNotFound(f"model {name!r} has no version folder in the repository")
            self._unloaded.discard(name)
            self._failed = {k: v for k, v in self._failed.items() if k[0] != name}
            await self._sync_model(name, on_disk)
            if name not in self.registry:
                raise NoLoadableVersion(self._why_not_served(name, on_disk))

    def _why_not_served(self, name: str, on_disk: Mapping[int, Path]) -> str:
        if not self._wanted(name, on_disk):
            return (f"model {name!r}: no version on disk ({sorted(on_disk)}) is pinned "
                    f"(version policy specific, pins {list(self.config.pinned.get(name, ()))})")
        reasons = "; ".join(f"version {v}: {self._failed[(name, v)][1]}"
                            for v in sorted(on_disk, reverse=True) if (name, v) in self._failed)
        return f"model {name!r}: no version could be loaded: {reasons}"

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of a model, until RepositoryModelLoad asks again."""
        check_model_name(name)
        async with self._lock:
            if name not in self.registry and name not in self._known:
                raise ModelNotFound(f"model {name!r} is neither loaded nor in the repository")
            self._unloaded.add(name)
            self._health.set(name, False)
            for version in self.registry.versions(name) if name in self.registry else []:
                await self._unload(name, version)

    async def index(self) -> list[IndexEntry]:
        """Every model version on disk or loaded, with its state and, when not served, why."""
        on_disk = await self._scan()
        entries = []
        for name in sorted(on_disk.keys() | set(self.registry.names())):
            loaded = set(self.registry.versions(name)) if name in self.registry else set()
            wanted = set(self._wanted(name, on_disk.get(name, {})))
            for version in sorted(on_disk.get(name, {}).keys() | loaded):
                entries.append(self._entry(name, version, loaded, wanted))
        return entries

    def _entry(self, name: str, version: int, loaded: set[int], wanted: set[int]) -> IndexEntry:
        key = (name, version)
        if version in loaded:
            return IndexEntry(name, version, "READY")
        if key in self._loading:
            return IndexEntry(name, version, "LOADING")
        if name in self._unloaded:
            reason = "unloaded by request"
        elif key in self._failed:
            reason = self._failed[key][1]
        elif version not in wanted:
            reason = f"not selected by version policy {self.config.version_policy}"
        else:
            reason = "a newer version is served" if loaded else "not loaded yet"
        return IndexEntry(name, version, "UNAVAILABLE", reason)

    async def close(self) -> None:
        """Stop polling (a load in progress is abandoned); the registry is closed by its owner."""
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
