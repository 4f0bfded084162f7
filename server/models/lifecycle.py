"""The model lifecycle: which versions are served, hot reload, explicit load and unload.

`ModelManager` keeps the registry in line with the repository on disk and the server's version
policy: at start-up, on every poll (`poll_interval_s`), and on RepositoryModelLoad/Unload.

Hot reload: a new version (the trainer renames a complete `.tmp-*` folder into place) is loaded
beside the one being served, in a worker thread; it is started and added to the registry in one
step on the event loop, which switches new requests to it; then the old version leaves the
registry and its batcher closes, which computes what was queued for it before it goes. A
request that picked the old version just before the switch is sent on to the new one
(api/pipeline.py `submit`), so a reload fails no request.

A version that fails to load is remembered (by its folder's identity and times) and not tried
again on every poll; it is retried when it changes, or on an explicit load.

Per-model settings (`<model>/model-settings.yaml`, models.settings) are read with the model and
on every poll; versions served with other settings than the file's now are reloaded beside
themselves and switched to, as a new version would be. A bad file keeps the settings the model
had (a model with none yet is not loaded), logged once per change of the file.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from snapserve.server.process import heap
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.runtime import RuntimeConfig
from snapserve.server.errors import ModelLoadError, ModelNotFound, ModelSettingsError, NoLoadableVersion
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.loading import load_version
from snapserve.server.models.policy import RepositoryConfig, check_model_name, wanted_versions
from snapserve.server.models.registry import ModelRegistry, scan_repository
from snapserve.server.models.settings import (EffectiveSettings, foreign_settings_notice,
                                              read_model_settings, settings_identity)

__all__ = ["IndexEntry", "LifecycleEvents", "ModelManager"]

logger = logging.getLogger(__name__)


def _ignore(*args: object) -> None:
    pass


@dataclass(frozen=True)
class LifecycleEvents:
    """What the lifecycle tells the rest of the server, which app.py connects to health and
    metrics: the lifecycle knows neither. Every callback runs on the event loop thread."""

    # A model takes requests (True: at least one version serves) or not (loading, unloaded).
    serving: Callable[[str, bool], None] = _ignore
    # A model left the repository: forget it.
    forgotten: Callable[[str], None] = _ignore
    # A version loaded, before it takes requests (to add observers to it).
    loaded: Callable[[ServedEnsemble], None] = _ignore
    # A version was unloaded (model, version).
    unloaded: Callable[[str, int], None] = _ignore
    # A version was refused at load: (model, reason), reason a ModelLoadError.reason or
    # "unexpected".
    load_failed: Callable[[str, str], None] = _ignore


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
                 batcher_config: BatcherConfig, registry: ModelRegistry,
                 events: LifecycleEvents = LifecycleEvents()) -> None:
        self.root = root
        self.config = config
        self.registry = registry
        self._runtime_config = runtime_config
        self._batcher_config = batcher_config
        self._events = events
        self._lock = asyncio.Lock()
        self._failed: dict[tuple[str, int], tuple[tuple[int, ...], str]] = {}
        self._loading: set[tuple[str, int]] = set()
        self._unloaded: set[str] = set()  # unloaded by request: polls leave them alone
        self._known: set[str] = set()     # models seen on disk, for health and removals
        # Per model seen: what the index says of a config.pbtxt or model-settings.json it has.
        self._notices: dict[str, str | None] = {}
        self._poller: asyncio.Task[None] | None = None
        # Per model: (settings file identity, what it is served with); the last bad file's
        # identity and message; with which settings each loaded version was loaded.
        self._settings: dict[str, tuple[tuple[int, ...] | None, EffectiveSettings]] = {}
        self._settings_errors: dict[str, tuple[tuple[int, ...] | None, str]] = {}
        self._served_with: dict[tuple[str, int], EffectiveSettings] = {}
        registry.refusal_reasons = self.refusal_reasons

    # -- scanning and syncing -------------------------------------------------------------

    async def _scan(self, warn: bool = False) -> dict[str, dict[int, Path]]:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, scan_repository, self.root, warn)
        return {name: {int(p.name): p for p in dirs} for name, dirs in found.items()}

    async def announce(self) -> None:
        """Every model of the repository known to health (NOT_SERVING) before the ports answer:
        a model whose load has not begun is not an unknown service."""
        async with self._lock:
            self._announce(await self._scan())

    def _announce(self, on_disk: Mapping[str, object]) -> None:
        # Each new model NOT_SERVING before the first of them loads: loads run one at a time,
        # and a model queued behind another's minutes of loading is not an unknown service.
        for name in on_disk.keys() - self._known:
            self._known.add(name)  # forgotten by the removal below if it leaves before loading
            if name not in self.registry:
                self._events.serving(name, False)

    async def load_all(self) -> None:
        """The start-up load: every model of the repository, as the policy says."""
        await self.poll_once(warn=True)

    async def poll_once(self, warn: bool = False) -> None:
        """Bring the registry in line with the repository now (what each poll does)."""
        async with self._lock:
            on_disk = await self._scan(warn)
            self._announce(on_disk)
            for name, versions in on_disk.items():
                if warn and not wanted_versions(self._repository_config(name), name, versions):
                    logger.warning("model %s: none of its versions %s is pinned; not serving it "
                                   "(version policy specific)", name, sorted(versions))
                if name not in self._unloaded:
                    await self._sync_model(name, versions)
            for name in sorted(self._known - on_disk.keys()):
                await self._remove_model(name)

    def refusal_reasons(self, name: str) -> dict[int, str]:
        """Why versions of `name` were refused at load, by version (until one loads again)."""
        return {v: reason for (n, v), (_, reason) in list(self._failed.items()) if n == name}

    # -- per-model settings ---------------------------------------------------------------

    def _repository_config(self, name: str) -> RepositoryConfig:
        """The version policy that applies to `name`: its settings file's, or the server's."""
        cached = self._settings.get(name)
        return self.config if cached is None else cached[1].repository

    def settings_error(self, name: str) -> str | None:
        """Why the model's settings file was refused, while that file stands."""
        error = self._settings_errors.get(name)
        return None if error is None else error[1]

    def _effective(self, name: str) -> EffectiveSettings | None:
        """What `name` is served with now: its settings file (re-read when it changed) over the
        server's configs. None when the file is bad and the model has no earlier settings."""
        model_dir = self.root / name
        identity = settings_identity(model_dir)
        cached = self._settings.get(name)
        if cached is not None and cached[0] == identity:
            return cached[1]
        error = self._settings_errors.get(name)
        if error is not None and error[0] == identity:  # the same bad file: logged already
            return None if cached is None else cached[1]
        try:
            settings = read_model_settings(model_dir)
            effective = EffectiveSettings.apply(name, settings, self._runtime_config,
                                                self._batcher_config, self.config)
        except ModelSettingsError as exc:
            self._settings_errors[name] = (identity, str(exc))
            self._events.load_failed(name, exc.reason)
            if cached is None:
                logger.error("not loading model %s: %s", name, exc)
                return None
            logger.error("model %s: keeping its previous settings: %s", name, exc)
            return cached[1]
        self._settings_errors.pop(name, None)
        if settings.given() or cached is not None:
            logger.info("model %s: settings %s", name, settings.given() or "none (server defaults)")
        self._settings[name] = (identity, effective)
        return effective

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

    async def _sync_model(self, name: str, on_disk: Mapping[int, Path]) -> None:
        if name not in self._notices:  # said once per model: a Triton/MLServer file it ignores
            self._notices[name] = foreign_settings_notice(self.root / name)
            if self._notices[name]:
                logger.warning("model %s: %s", name, self._notices[name])
        self._known.add(name)
        loaded = set(self.registry.versions(name)) if name in self.registry else set()
        if not loaded:
            self._events.serving(name, False)  # NOT_SERVING while its first version loads
        effective = self._effective(name)
        if effective is None:  # a bad settings file and no earlier settings: nothing loaded
            return
        serve: list[int] = []
        for version in wanted_versions(effective.repository, name, on_disk):
            if version in loaded and self._served_with.get((name, version)) != effective:
                # Its settings changed: reload it with them; if that fails, it goes on as it was.
                await self._load(name, version, on_disk[version], effective)
                serve.append(version)
            elif version in loaded or await self._load(name, version, on_disk[version], effective):
                serve.append(version)
            if serve and effective.repository.version_policy == "latest":
                break
        for version in sorted(loaded - set(serve)):
            await self._unload(name, version)
        self._events.serving(name, bool(serve))

    async def _load(self, name: str, version: int, path: Path, effective: EffectiveSettings) -> bool:
        """Load, start and register one version with `effective` settings; False (logged once)
        if it cannot be served. A loaded version of the same number is replaced, then closed."""
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
            served = await loop.run_in_executor(None, load_version, path, effective.runtime,
                                                 effective.batcher)
        except ModelLoadError as exc:
            reason, label = str(exc), exc.reason
            logger.error("refusing model %s version %d: %s", name, version, reason)
        except Exception as exc:  # a bug or an OS error must not take the other models down
            reason, label = f"unexpected error: {exc!r}", "unexpected"
            logger.exception("refusing model %s version %d: unexpected error", name, version)
        else:
            served.settings = effective.describe()
            self._events.loaded(served)
            await served.start()
            previous = self._loaded_version(name, version)
            self.registry.add(served)  # from here, requests without a version get the newest
            self._served_with[key] = effective
            self._failed.pop(key, None)
            if previous is not None:  # reloaded with new settings: the old copy finishes its queue
                await previous.close()
                del previous
                heap.collect_retired()  # even if it was frozen at start-up (server/process/heap.py)
            logger.info("loaded model %s version %d: %d members, method %s, on %s",
                        name, version, served.runtime.members, served.manifest.method or "?",
                        served.runtime.provider)
            return True
        finally:
            self._loading.discard(key)
        self._failed[key] = (identity, reason)
        self._events.load_failed(name, label)
        return False

    def _loaded_version(self, name: str, version: int) -> ServedEnsemble | None:
        if name in self.registry and version in self.registry.versions(name):
            return self.registry.get(name, version)
        return None

    async def _unload(self, name: str, version: int) -> None:
        served = self.registry.remove(name, version)  # new requests no longer see it
        self._served_with.pop((name, version), None)
        logger.info("unloading model %s version %d once its queued requests are answered",
                    name, version)
        await served.close()
        del served
        heap.collect_retired()  # even if it was frozen at start-up (server/process/heap.py)
        self._events.unloaded(name, version)
        logger.info("unloaded model %s version %d", name, version)

    async def _remove_model(self, name: str) -> None:
        logger.warning("model %s left the repository; no longer serving it", name)
        for version in self.registry.versions(name) if name in self.registry else []:
            await self._unload(name, version)
        self._known.discard(name)
        self._notices.pop(name, None)
        self._unloaded.discard(name)
        self._failed = {k: v for k, v in self._failed.items() if k[0] != name}
        self._settings.pop(name, None)
        self._settings_errors.pop(name, None)
        self._events.forgotten(name)

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
            self._settings_errors.pop(name, None)  # read the settings file again
            await self._sync_model(name, on_disk)
            if name not in self.registry:
                raise NoLoadableVersion(self._why_not_served(name, on_disk))

    def _why_not_served(self, name: str, on_disk: Mapping[int, Path]) -> str:
        if name not in self._settings and (error := self.settings_error(name)) is not None:
            return f"model {name!r}: {error}"
        config = self._repository_config(name)
        if not wanted_versions(config, name, on_disk):
            return (f"model {name!r}: no version on disk ({sorted(on_disk)}) is pinned "
                    f"(version policy specific, pins {list(config.pinned.get(name, ()))})")
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
            self._events.serving(name, False)
            for version in self.registry.versions(name) if name in self.registry else []:
                await self._unload(name, version)

    async def index(self) -> list[IndexEntry]:
        """Every model version on disk or loaded, with its state and, when not served, why."""
        on_disk = await self._scan()
        entries = []
        for name in sorted(on_disk.keys() | set(self.registry.names())):
            loaded = set(self.registry.versions(name)) if name in self.registry else set()
            wanted = set(wanted_versions(self._repository_config(name), name, on_disk.get(name, {})))
            for version in sorted(on_disk.get(name, {}).keys() | loaded):
                entries.append(self._entry(name, version, loaded, wanted))
        return entries

    def _entry(self, name: str, version: int, loaded: set[int], wanted: set[int]) -> IndexEntry:
        key = (name, version)
        if version in loaded:
            return IndexEntry(name, version, "READY", self._notices.get(name) or "")
        if key in self._loading:
            return IndexEntry(name, version, "LOADING")
        if name in self._unloaded:
            reason = "unloaded by request"
        elif key in self._failed:
            reason = self._failed[key][1]
        elif name not in self._settings and (error := self.settings_error(name)) is not None:
            reason = error
        elif version not in wanted:
            reason = f"not selected by version policy {self._repository_config(name).version_policy}"
        else:
            reason = "a newer version is served" if loaded else "not loaded yet"
        notice = self._notices.get(name)
        return IndexEntry(name, version, "UNAVAILABLE", f"{reason}; {notice}" if notice else reason)

    async def close(self) -> None:
        """Stop polling (a load in progress is abandoned); the registry is closed by its owner."""
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
