"""Check a composed config against the code it configures, before any heavy import.

Every key of a ``_target_`` node must be a keyword of the target (read from its source,
:mod:`pse_lightning.cli.signature`), every value of the kind its annotation admits, and the
constructor's own range checks pass on it; keys of plain nodes (``training``, ``paths``,
the top level) must occur in some file of their config group. Each failure is one
:class:`~pse_lightning.validation.InputError` naming the full key path, the value and the fix.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pse_lightning import validation
from pse_lightning.cli.kinds import Kind, kind, kind_of
from pse_lightning.cli.signature import Signature, evaluate, signature_of
from pse_lightning.cli.source import NO_VALUE, find_definition, literal
from pse_lightning.validation import InputError

#: Keys Hydra's instantiate reads itself.
OWN_PACKAGE = "pse_lightning."
_TARGET_LINE = re.compile(r"^\s*_target_:\s*['\"]?([\w.]+)", re.MULTILINE)
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)


def top_level_kinds() -> dict[str, Kind]:
    """The kinds of the top-level settings (``stage`` choices come from the pipeline)."""
    found = find_definition("pse_lightning.pipeline", "STAGES")
    stages = literal(found.source, found.node) if found is not None else NO_VALUE  # type: ignore[arg-type]
    return {
        "stage": Kind(frozenset({"str"}), None if stages is NO_VALUE else tuple(stages)),
        "seed": Kind(frozenset({"int"})),
        "data_seed": Kind(frozenset({"int"})),
        "model_checkpoint": Kind(frozenset({"str", "none"})),
        "resume": Kind(frozenset({"bool"})),
        "log_examples": Kind(frozenset({"int"})),
    }


def read_config_file(path: Path) -> str:
    """The text of a config file, read once per process while the file is unchanged (its
    modification time and size): a multirun's preflight composes and checks every job,
    each with its own :class:`ConfigFiles`, over the same files."""
    stat = path.stat()
    return _read_text(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _read_text(path: Path, mtime_ns: int, size: int) -> str:
    return path.read_text(encoding="utf-8")


def parse_config_file(path: Path) -> tuple[str | None, dict, tuple]:
    """A config file's ``# @package`` header (None without one), its content without the
    defaults list, and that list; parsed once per process while the file is unchanged
    (parsing, not reading, was most of a config check's time). Shared: do not modify."""
    stat = path.stat()
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _parse(path: Path, mtime_ns: int, size: int) -> tuple[str | None, dict, tuple]:
    text = _read_text(path, mtime_ns, size)
    header = _PACKAGE.search(text)
    content = OmegaConf.to_container(OmegaConf.create(text or "{}")) or {}
    defaults = tuple(content.pop("defaults", [])) if isinstance(content, dict) else ()
    return (header.group(1) if header else None), content, defaults


class ConfigFiles:
    """What the files of ``conf/`` (and of the extension folders on Hydra's search path)
    declare: the choices of each group and their keys.

    Args:
        conf_dir: the primary config folder (holds ``config.yaml``).
        extra_dirs: more config folders, as ``hydra.searchpath`` adds them; a choice file
            is looked up in ``conf_dir`` first, then in these, in order.
    """

    def __init__(self, conf_dir: Path, extra_dirs: Sequence[Path] = ()) -> None:
        self.conf_dir = conf_dir
        self.dirs = (conf_dir, *extra_dirs)

    @functools.cached_property
    def main(self) -> dict:
        _, content, defaults = parse_config_file(self.conf_dir / "config.yaml")
        return {**content, "defaults": list(defaults)}

    def groups(self) -> list[str]:
        """The groups of the main config's defaults list."""
        names = []
        for entry in self.main.get("defaults", []):
            if isinstance(entry, dict):
                names += [k.split("@")[0].removeprefix("override ") for k in entry]
        return [n for n in names if not n.startswith("hydra")]

    def top_level_keys(self) -> set[str]:
        return {k for k in self.main if k not in ("defaults", "hydra")} | set(self.groups())

    def choices(self, group: str) -> list[str]:
        return sorted({p.stem for d in self.dirs for p in (d / group).glob("*.yaml")})

    @functools.cache  # noqa: B019 (one instance per CLI call)
    def placed(self, group: str, choice: str) -> tuple[tuple[str, dict], ...]:
        """(package, content) of a choice file and of the same-group files it includes."""
        found = [d / group / f"{choice}.yaml" for d in self.dirs]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            return ()
        header, content, defaults = parse_config_file(path)
        package = header or group
        placed: list[tuple[str, dict]] = []
        for entry in defaults:
            if isinstance(entry, str) and entry != "_self_":
                placed += self.placed(group, entry)
        return (*placed, ("" if package == "_global_" else package, content))

    def keys_at(self, path: str) -> set[str] | None:
        """Keys any choice of the path's group puts at ``path`` (None: no file says)."""
        group = path.split(".")[0]
        found: set[str] | None = None
        for choice in self.choices(group):
            for package, content in self.placed(group, choice):
                node = descend(content, package, path)
                if isinstance(node, dict):
                    found = (found or set()) | set(node)
        return found

    def kind_at(self, path: str) -> Kind | None:
        """The kind of a plain (no ``_target_``) setting, from the values the group's files
        give it; None when they give none or disagree (interpolations say nothing)."""
        group, _, key = path.rpartition(".")
        seen = set()
        for choice in self.choices(path.split(".")[0]):
            for package, content in self.placed(path.split(".")[0], choice):
                node = descend(content, package, group)
                value = node.get(key) if isinstance(node, dict) else None
                if value is not None and not (isinstance(value, str) and "${" in value):
                    seen.add(kind_of(value))
        if len(seen) != 1 or seen & {"list", "dict"}:
            return None
        return Kind(frozenset({"int", "float"}) if seen == {"float"} else frozenset(seen))

    @functools.cached_property
    def targets(self) -> frozenset[str]:
        """Every ``_target_`` a config file names (``conf/`` and the search path's folders);
        each file is read once per process (a multirun's preflight checks every job)."""
        found: set[str] = set()
        for folder in self.dirs:
            for path in folder.rglob("*.yaml"):
                found.update(_TARGET_LINE.findall(read_config_file(path)))
        return frozenset(found)

    def choices_with(self, group: str, key: str) -> list[str]:
        """The choices of ``group`` that set ``group.key``."""
        return [
            choice
            for choice in self.choices(group)
            if any(
                key in (descend(content, package, group) or {})
                for package, content in self.placed(group, choice)
            )
        ]


def descend(content: object, package: str, path: str) -> object:
    """The node at ``path`` of a file whose content sits at ``package`` (a file placed
    below ``path``, such as ``analysis.pse`` seen from ``analysis``, appears as a key)."""
    here = package.split(".") if package else []
    want = path.split(".")
    common = min(len(here), len(want))
    if want[:common] != here[:common]:
        return None
    for part in reversed(here[len(want) :]):
        content = {part: content}
    for part in want[len(here) :]:
        if not isinstance(content, dict):
            return None
        content = content.get(part)
    return content


def value_of(node: DictConfig, key: str) -> object:
    """``node[key]`` resolved, or ``NO_VALUE`` when it cannot be resolved yet (a
    ``${hydra:...}`` value before the run directory exists)."""
    try:
        return node[key]
    except OmegaConfBaseException:
        return NO_VALUE


def search_path_dirs(cfg: DictConfig, searchpath: Sequence[str] = ()) -> list[Path]:
    """The config folders ``hydra.searchpath`` adds (``file://`` entries, relative to the
    working directory as Hydra reads them; ``pkg://`` entries resolved by import).

    Args:
        cfg: the composed config; its ``hydra.searchpath`` is used when it has a ``hydra``
            node.
        searchpath: the search path for a job's config without its ``hydra`` node, as the
            entry point hands it down (nothing here reads Hydra's global state).
    """
    entries = OmegaConf.select(cfg, "hydra.searchpath", default=None)
    if entries is None:
        entries = searchpath
    dirs = []
    for entry in entries or []:
        scheme, _, where = str(entry).partition("://")
        if scheme == "file":
            dirs.append(Path(where))
        elif scheme == "pkg":
            spec = importlib.util.find_spec(where.replace("/", "."))
            if spec is not None and spec.submodule_search_locations:
                dirs += [Path(p) for p in spec.submodule_search_locations]
    return dirs


def check_config(
    cfg: DictConfig,
    choices: Mapping[str, str | None],
    conf_dir: Path,
    searchpath: Sequence[str] = (),
) -> None:
    """Raise :class:`InputError` for the first key of ``cfg`` the code cannot use.

    Args:
        cfg: the composed config (with or without its ``hydra`` node).
        choices: the chosen file of each group (``hydra.runtime.choices``).
        conf_dir: the config directory the config was composed from.
        searchpath: ``hydra.searchpath`` for a config without its ``hydra`` node (a job's
            config inside the run).
    """
    files = ConfigFiles(conf_dir, search_path_dirs(cfg, searchpath))
    _check_top_level(cfg, files)
    check_required_values(cfg)
    _check_seed(value_of(cfg, "seed"))
    _check_seed(value_of(cfg, "data_seed"), "data_seed")
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig) and "devices" in trainer:
        _check_devices(value_of(trainer, "devices"))
    for group in files.groups():
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            _check_node(node, group, files, choices)


def check_required_values(cfg: DictConfig) -> None:
    """Settings given as ``key=`` (empty): ``paths.root=`` would put every run and cache at
    the filesystem root, ``model_checkpoint=`` would train instead of loading."""
    for path in validation.REQUIRED_VALUES:
        group, _, key = path.rpartition(".")
        node = cfg.get(group) if group else cfg
        if isinstance(node, DictConfig) and key in node:
            require("require_value", path, node._get_node(key)._value())


def _check_seed(seed: object, key: str = "seed") -> None:
    """numpy and the data generators take seeds in [0, 2**32 - 1]: say so before any work
    (a negative seed used to fail in numpy after the data module had started)."""
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**32:
        raise InputError(
            f"{key} must be in [0, 2**32 - 1] (numpy's seed range), got {seed}; pass a "
            f"non-negative integer such as {key}=0"
        )


def _check_devices(devices: object) -> None:
    """Lightning takes a count >= 1, -1 (all), 'auto' or a list; 0 used to fail in Lightning
    with 15 lines after 24 s of start-up."""
    if (
        isinstance(devices, int)
        and not isinstance(devices, bool)
        and devices < 1
        and devices != -1
    ):
        raise InputError(
            f"trainer.devices must be a count >= 1, -1 (all) or auto, got {devices}; "
            "pass trainer.devices=1 (or 2 for trainer=ddp_cpu)"
        )


def _check_top_level(cfg: DictConfig, files: ConfigFiles) -> None:
    allowed = files.top_level_keys()
    for key in cfg:
        if key != "hydra" and key not in allowed:
            raise InputError(
                f"{key} is not a setting (top-level keys: {', '.join(sorted(allowed))}); "
                f"drop +{key}=..., or put it under its group (e.g. attack.{key})"
            )
    for key, admits in top_level_kinds().items():
        value = value_of(cfg, key) if key in cfg else NO_VALUE
        if value is not NO_VALUE and not admits.admits(value):
            raise InputError(f"{key} must be {admits.describe()}, got {value!r}")
    require("require_at_least", "log_examples", cfg.get("log_examples", 0), 0)
    if cfg.get("stage") == "fit" and cfg.get("model_checkpoint"):
        raise InputError(
            "stage=fit trains a new model, but model_checkpoint is set: drop "
            "model_checkpoint=... to train, or use stage=evaluate to evaluate that file"
        )


def _check_node(
    node: DictConfig, path: str, files: ConfigFiles, choices: Mapping[str, str | None]
) -> None:
    if "_target_" in node:
        _check_target(node, path, files, choices)
        return
    known = files.keys_at(path)
    for key in node:
        if known is not None and key not in known:
            raise InputError(
                f"{path}.{key} is not a setting; the keys of {path} are {', '.join(sorted(known))}"
            )
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _check_node(child, f"{path}.{key}", files, choices)
            continue
        admits = files.kind_at(f"{path}.{key}")
        value = value_of(node, key)
        if admits is not None and value is not NO_VALUE and not admits.admits(value):
            raise InputError(f"{path}.{key} must be {admits.describe()}, got {value!r}")
    trains = value_of(node, "name") != "none"
    if path == "training" and trains and isinstance(value_of(node, "epochs"), int):
        require("require_at_least", "training.epochs", node.epochs, 1)


def _check_target(
    node: DictConfig, path: str, files: ConfigFiles, choices: Mapping[str, str | None]
) -> None:
    target = str(node._target_)
    if not target.startswith(OWN_PACKAGE) and target not in files.targets:
        # instantiate() imports and calls whatever a _target_ names: an override may only
        # pick this package's classes, or ones a config file (conf/ or an extension folder
        # on hydra.searchpath) names.
        raise InputError(
            f"{path}._target_={target} is not allowed: a _target_ override must name a class "
            f"of {OWN_PACKAGE.rstrip('.')} or one a config file names; put an extension's "
            "YAML in a folder on hydra.searchpath (README, Extending)"
        )
    signature = signature_of(target)
    if signature is None:
        return  # not plain Python source (an extension module): instantiation checks it
    values: dict[str, object] = {}
    for key in node:
        if key in HYDRA_KEYS:
            continue
        param = signature.params.get(key)
        if param is None and not signature.open:
            raise InputError(_unknown_key(path, key, signature, files, choices))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and "_target_" in child:
            _check_node(child, f"{path}.{key}", files, choices)
            continue
        value = value_of(node, key)
        if value is NO_VALUE:
            continue
        values[key] = value
        admits = None if param is None else kind(param.source, param.annotation)
        if admits is not None and not admits.admits(value):
            raise InputError(f"{path}.{key} must be {admits.describe()}, got {value!r}")
    _run_checks(signature, values, path)


def _run_checks(signature: Signature, values: dict[str, object], path: str) -> None:
    """Re-run the constructor's ``require_*`` checks on the keys the config sets."""
    known = dict(values)
    for name, param in signature.params.items():
        if name not in known and param.source is not None:
            default = literal(param.source, param.default)
            if default is not NO_VALUE:
                known[name] = default
    for check in signature.checks:
        if check.param not in values:
            continue
        arguments = evaluate(check, known)
        if arguments is None:
            continue
        args, keywords = arguments
        require(check.function, f"{path}.{check.param}", values[check.param], *args, **keywords)


def require(function: str, key: str, value: object, *args: object, **keywords: object) -> None:
    """Run ``pse_lightning.validation.<function>`` on a config value; its error becomes an
    :class:`InputError`."""
    try:
        getattr(validation, function)(key, value, *args, **keywords)
    except (ValueError, TypeError) as err:
        raise InputError(str(err)) from None


def _unknown_key(
    path: str,
    key: str,
    signature: Signature,
    files: ConfigFiles,
    choices: Mapping[str, str | None],
) -> str:
    group = path.split(".")[0]
    chosen = choices.get(group)
    where = f"{group}={chosen}" if path == group and chosen else path
    settings = ", ".join(sorted(signature.params))
    message = (
        f"{path}.{key} is not a setting of {where} ({signature.target}; its keys: {settings})"
    )
    others = files.choices_with(group, key) if path == group else []
    if others:
        return f"{message}; {key} is a setting of {group}={', '.join(others)}: choose one of those"
    return f"{message}; drop {path}.{key}"
