"""The typed configuration of a run: defaults < YAML (``--configs``) < command line.

One dataclass field per option; the argparse parser and the YAML validation are both generated
from it, so a flag and its YAML key can never drift apart. YAML keys use underscores
(``mask_lr``) as in the HYDRA/BiP files; flags use dashes (``--mask-lr``). An unknown key or flag
is a ``UserError`` naming the closest valid one. YAML is read with ``yaml.safe_load`` only.

A resumed run (``--resume``) takes its configuration from the checkpoint: see ``resumed_config``.
``Config.validate`` checks each option's own value; the checks across options live in
``configs.checks``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from configs.choices import DECODE_MODES, LAYER_TYPES, MODES, OPTIMIZERS, SCHEDULES, SCOPES, SCORE_INITS
from configs.errors import UserError
from configs.options import (
    BilevelOptions,
    LthOptions,
    ObsUpdateOptions,
    RobustOptions,
    SpeedOptions,
    WoodFisherOptions,
    at_least,
    check_fields,
    finite_non_negative,
    fraction,
    nm_pattern,
    non_negative,
    opt,
)

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
SEED_LIMIT = 2**63  # torch.manual_seed takes a signed 64-bit integer


@dataclass(frozen=True)
class Config(SpeedOptions, LthOptions, RobustOptions, ObsUpdateOptions, WoodFisherOptions, BilevelOptions):
    """Every option of a run: the general ones below, and the trainers' sections (``configs.options``)."""
    # primary
    configs: str | None = opt(None, "YAML file of options (defaults < YAML < command line)", group="primary")
    exp_mode: str = opt("pretrain", "pretrain: train all weights; prune: learn a mask (and weights with bilevel); "
                        "finetune: train weights under the fixed mask of --source-net", MODES, "primary")
    exp_name: str = opt("temp", "experiment name: the run folder is RESULT_DIR/EXP_NAME/EXP_MODE/N--...",
                        group="primary")
    result_dir: str = opt("./results", "root folder of run folders", group="primary")
    device: str = opt("auto", "auto (cuda when available), cpu, cuda or cuda:N", group="primary")
    # model and mask
    arch: str = opt("smallcnn", "architecture name", group="model")
    num_classes: int | None = opt(None, "number of classes; must match the dataset (default: the dataset's)",
                                  group="model")
    layer_type: str = opt("unstructured", "mask granularity; dense = plain layers, no mask; nm = N:M semi-structured "
                          "(see --nm)", LAYER_TYPES, "model")
    nm: str = opt("2:4", "with --layer-type nm: keep N of every M consecutive weights along the input dimension "
                  "(--k must be N/M; --scope does not apply)", group="model", check=nm_pattern)
    k: float = opt(1.0, "density: fraction of weights (or filters/channels) KEPT, in (0, 1]", group="model")
    scope: str = opt("global", "global: one top-k over all layers (BiP); layer: k in every layer (HYDRA)", SCOPES,
                     "model")
    layer_floor: int | None = opt(None, "with --scope global, every layer keeps at least this many units "
                                  "(default: 1 filter/channel for structured masks, 0 for unstructured)", group="model",
                                  check=non_negative)
    exclude_layers: str | None = opt(None, "layers kept dense (no mask, never pruned) by every trainer and "
                                     "granularity: comma-separated fnmatch patterns of module names, e.g. conv1,fc "
                                     "or 'layer1.*'; recorded in checkpoints, honoured by export.py", group="model")
    scaled_score_init: bool = opt(False, "prune: init scores as sqrt(6/fan_in) * w / max|w| (HYDRA); finetune from a "
                                  "dense checkpoint: HYDRA's magnitude baseline, the mask is the top-k of |w| (per "
                                  "layer with --scope layer, over all layers with --scope global), no score training",
                                  group="model")
    coupled: bool = opt(False, "with --layer-type filter (or channel): one keep/drop decision per dependency group of "
                        "tied filters (or of the input channels that read one channel) (residual additions, depthwise "
                        "convs and their producers, grouped convs, squeeze-excitation, ConvNeXt's LayerNorms), "
                        "scored by the L2 norm of its members' scores (HYDRA, BiP) or their summed statistic "
                        "(WoodFisher), so a pruned channel disappears everywhere it flows and "
                        "slimming removes it whole; --scope layer keeps k of each group family (a residual stream, a "
                        "plain conv)", group="model")
    k_schedule: str = opt("none", "prune with HYDRA/BiP: anneal the density from --init-density to --k over "
                          "--schedule-epochs epochs (one value per epoch, every selection exactly n_keep(k, N)): "
                          "none (k from the start), linear, cosine, exponential, onecycle, agp[:POWER] (3), "
                          "iterative[:STEPS] (3), oneshot; only epochs at the final k compete for model_best",
                          group="model")
    init_density: float = opt(1.0, "with --k-schedule: the density at epoch 0, in [k, 1]", group="model")
    schedule_epochs: int | None = opt(None, "with --k-schedule: --k is reached at epoch N - 1 (default: the run's last "
                                      "epoch)", group="model", check=at_least(1))
    layer_k: str | None = opt(None, "prune with per-layer densities: a JSON file ({layer: k}, or python -m "
                              "study.sensitivity's layer_k.json); each layer keeps exactly n_keep(k, its units) (at "
                              "WoodFisher's last event, LTH's last round); --k must be the overall density they make",
                              group="model")
    scores_init_type: str = opt("kaiming_uniform", "score init when not --scaled-score-init", SCORE_INITS, "model")
    freeze_bn: bool = opt(False, "keep BatchNorm affine parameters fixed (HYDRA uses it in prune)", group="model")
    source_net: str | None = opt(None, "checkpoint to prune (prune) or to fine-tune (finetune)", group="model")
    reset_head: bool = opt(False, "drop the --source-net classifier (the model's last Linear layer) and keep a freshly "
                           "initialised one, e.g. to start from an ImageNet checkpoint on another class count",
                           group="model")
    # data
    dataset: str = opt("Digits", "dataset name (Digits ships with scikit-learn: no download)", group="data")
    data_dir: str = opt("./datasets", "folder holding the dataset files", group="data")
    normalize: bool = opt(False, "normalize inputs with the dataset's mean/std", group="data")
    image_dim: int | None = opt(None, "input image size (default: the dataset's)", group="data")
    batch_size: int = opt(128, "training batch size (under torchrun the global batch, split over the processes)",
                          group="data", check=at_least(1))
    test_batch_size: int = opt(128, "evaluation batch size", group="data", check=at_least(1))
    num_workers: int = opt(0, "DataLoader worker processes (0 = load in the main process)", group="data",
                           check=non_negative)
    data_fraction: float = opt(1.0, "train on this fraction of the training set (a fixed, seeded subset)", group="data",
                               check=fraction(low_open=True, high_open=False))
    val_fraction: float = opt(0.0, "bilevel: hold out this fraction of the training set for the upper level "
                              "(0 = an independent shuffle of the whole training set, as BiP)", group="data",
                              check=fraction(low_open=False, high_open=True))
    skip_bad_records: bool = opt(False, "LMDB: skip and count undecodable records instead of stopping", group="data")
    decode: str = opt("auto", "where JPEG datasets (ImageNet, TinyImageNet) are decoded and augmented: gpu = in "
                      "batches on the run's CUDA device (the CPU path's crops and flips, pixels within resampling "
                      "differences); cpu = PIL in the DataLoader workers; auto = gpu on a CUDA device, else cpu",
                      DECODE_MODES, "data")
    # training
    trainer: str = opt("base", "base (pretrain / HYDRA prune / finetune), bilevel (BiP), woodfisher (gradual OBS) or "
                       "lth (iterative magnitude pruning with rewinding)",
                       group="train")
    epochs: int = opt(100, "number of epochs", group="train", check=at_least(1))
    optimizer: str = opt("sgd", "optimizer of weights and of scores", OPTIMIZERS, "train")
    lr: float = opt(0.1, "learning rate (of scores in HYDRA prune, of weights otherwise)", group="train",
                    check=finite_non_negative)
    lr_schedule: str = opt("cosine", "learning-rate schedule", SCHEDULES, "train")
    wd: float = opt(5e-4, "weight decay", group="train", check=finite_non_negative)
    momentum: float = opt(0.9, "SGD/RMSprop momentum", group="train", check=finite_non_negative)
    warmup_epochs: int = opt(0, "epochs at --warmup-lr before the schedule starts", group="train", check=non_negative)
    warmup_lr: float = opt(0.1, "learning rate during warmup", group="train", check=finite_non_negative)
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss", group="train",
                                 check=fraction(low_open=False, high_open=True))
    bn_l1: float = opt(0.0, "Network Slimming's sparsity penalty (Liu et al. 2017): add LAMBDA * sign(gamma) to the "
                       "gradient of every BatchNorm weight before each step of the weight optimizer (pretrain, "
                       "finetune, and the weight steps of every trainer; HYDRA's prune step, which trains BatchNorm "
                       "with the scores, too); 0 = off; pair with --prune-method slimming", group="train",
                       check=finite_non_negative)
    # bilevel (BiP)
    mask_lr: float = opt(0.1, "bilevel: learning rate of the scores (upper level)", group="bilevel",
                         check=finite_non_negative)
    mask_lr_schedule: str = opt("cosine", "bilevel: schedule of --mask-lr (step: x0.1 at 75%, x0.01 at 90%)", SCHEDULES,
                                "bilevel")
    # run control
    resume: str | None = opt(None, "checkpoint of this run to continue from; auto: the newest unfinished run of "
                             "RESULT_DIR/EXP_NAME/EXP_MODE (a checkpoint, no summary.json), else a new run (one "
                             "command for a first start and every restart)", group="run")
    evaluate: bool = opt(False, "only evaluate the model (from --source-net or --resume) and exit", group="run")
    save_dense: bool = opt(False, "also write the dense state dict (masks applied) next to checkpoints", group="run")
    seed: int = opt(1234, "random seed", group="run")
    print_freq: int = opt(100, "log every N batches in the run log", group="run", check=at_least(1))
    progress: bool | None = opt(None, "progress bar per epoch (default: only when stderr is a terminal; otherwise, "
                                "and with --no-progress, a line every --print-freq batches)", group="run")
    dist_timeout: int = opt(600, "torchrun: seconds a process waits for the others in a collective before the run "
                            "stops (a process that died or hangs)", group="run", check=at_least(1))

    def validate(self) -> Config:
        """Each option's own value; checks across options are ``configs.checks``'."""
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise UserError(f"unsupported --device '{self.device}'; use auto, cpu, cuda or cuda:N")
        if not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"--seed must be in [0, 2**63), got {self.seed}")
        if not (isinstance(self.k, float) and 0.0 < self.k <= 1.0) or math.isnan(self.k):
            raise UserError(f"--k is the density (fraction kept) and must be in (0, 1], got {self.k}; e.g. --k 0.05 "
                            "keeps 5%")
        check_fields(self)  # each option's own check, declared with it (configs.options.opt)
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Flags in the order a user reads them (--help, the README table): general groups first, then the
# trainers' sections; dataclass inheritance would list the sections' fields first.
GROUP_ORDER = ("primary", "model", "data", "train", "robust", "bilevel", "fisher", "woodfisher", "lth", "speed", "run")
FIELDS = {f.name: f for f in sorted(dataclasses.fields(Config), key=lambda f: GROUP_ORDER.index(f.metadata["group"]))}
_TYPES = typing.get_type_hints(Config)
# Old names still accepted (a flag, a YAML key, a saved config): alias -> option.
ALIASES = {alias: name for name, f in FIELDS.items() for alias in f.metadata["aliases"]}


def _base_type(name: str) -> type:
    t = _TYPES[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _closest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def coerce(name: str, value: Any, where: str) -> Any:
    """Check one value against its field's type and choices; returns the converted value."""
    f, t = FIELDS[name], _base_type(name)
    if value is None and _TYPES[name] is not t:
        return None
    try:
        if t is bool:
            if not isinstance(value, bool):
                raise TypeError
        elif t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
        elif t is float:
            # YAML 1.1 reads "1e-4" as a string: accept any string Python parses as a float.
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif t is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            value = str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {name} must be {t.__name__}, got {value!r}") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise UserError(f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}"
                        f"{_closest(str(value), choices)}")
    return value


# A config is a flat mapping of option: value; these bounds only stop hostile or mistaken files
# (a dataset passed by mistake, a YAML bomb) before PyYAML spends memory or recursion on them.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32  # PyYAML's composer recurses per level: far below Python's recursion limit


def _yaml_depth_error(text: str) -> str | None:
    """Where ``text`` nests deeper than MAX_CONFIG_DEPTH, found from the event stream (which does not
    recurse), stopping at the first such point; None when it does not."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                assert event.start_mark is not None  # the parser marks every event it emits
                return f"line {event.start_mark.line + 1}"
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return None


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}; pass an existing YAML file to --configs (see configs/)")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read config file {path} ({exc.strerror}); check its permissions") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config file; pass a YAML "
                        "file of option: value lines to --configs (see configs/)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not a UTF-8 YAML text file (byte {exc.start} is not UTF-8); pass a YAML "
                        "file of option: value lines to --configs (see configs/)") from None
    try:
        deep = _yaml_depth_error(text)
        if deep is not None:
            raise UserError(f"{path}: nested more than {MAX_CONFIG_DEPTH} levels deep at {deep}; a config is a "
                            "flat mapping of option: value")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    out = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in FIELDS or key == "configs":
            options = [k for k in FIELDS if k != "configs"]
            raise UserError(f"{path}: unknown key {str(raw_key)!r}{_closest(key, options)}")
        if isinstance(value, (dict, list, set)):
            # Every option is one scalar; the value is not printed (aliases can make it huge).
            kind = "mapping" if isinstance(value, dict) else "list"
            raise UserError(f"{path}: {key} must be a single {_base_type(key).__name__} value, got a {kind}")
        out[key] = coerce(key, value, path)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print usage and exit; we want one line
        raise UserError(f"{message} (see python train.py --help)")


def build_parser(names: Mapping[str, Sequence[str]] | None = None) -> argparse.ArgumentParser:
    """The command line of train.py. ``names``: the registered names of the options a registry fills
    (--arch, --dataset, ...; configs/ imports no registry), listed in their --help."""
    parser = _Parser(prog="train.py", description="Prune image classifiers with HYDRA, BiP or WoodFisher.",
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    groups: dict[str, Any] = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flags = ["--" + n.replace("_", "-") for n in (name, *meta["aliases"])]
        listed = f"; one of: {', '.join(names[name])}" if names and name in names else ""
        help_text = f"{meta['help']} (default: {f.default}{listed})".replace("%", "%%")  # argparse %-formats help
        if _base_type(name) is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            t = _base_type(name)
            metavar = None if meta["choices"] else t.__name__.upper()  # None: argparse shows {a,b,c}
            group.add_argument(*flags, dest=name, type=t, choices=meta["choices"], help=help_text, metavar=metavar)
    return parser


@dataclass(frozen=True)
class Options:
    """A parsed command line: every value (defaults < YAML < command line, each type-checked) and
    which keys the user set, so that a resumed run can tell a choice from a default."""
    values: dict[str, Any]
    from_cli: frozenset[str]
    from_yaml: frozenset[str]

    @property
    def explicit(self) -> frozenset[str]:
        return self.from_cli | self.from_yaml

    def config(self) -> Config:
        return Config(**self.values).validate()


def read_options(argv: list[str], *, names: Mapping[str, Sequence[str]] | None = None) -> Options:
    """Parse a command line (without the program name); nothing is validated across options yet.
    ``names``: the registries' names for --help (``build_parser``)."""
    parser = build_parser(names)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0]
        flags = ["--" + n.replace("_", "-") for n in FIELDS]
        raise UserError(f"unknown option '{first}'{_closest(first.split('=')[0], flags)} (see python train.py --help)")
    cli = vars(args)  # argument_default=SUPPRESS: only the flags given
    values = {name: f.default for name, f in FIELDS.items()}
    yaml_values = read_yaml(cli["configs"]) if cli.get("configs") else {}
    values.update(yaml_values)
    values.update({name: coerce(name, v, "command line") for name, v in cli.items()})
    return Options(values=values, from_cli=frozenset(cli), from_yaml=frozenset(yaml_values))


def load_config(argv: list[str]) -> Config:
    """Parse a command line (without the program name) into a Config whose every option has a valid value
    of its own (the checks across options are ``configs.checks.check_run``'s)."""
    return read_options(argv).config()


# -- resume: the checkpoint's config is the run's config ------------------------------------------
# Options that do not change what the run computes: a resumed run may use new values (recorded in
# its run.log and config.yml). Every other option shapes the trajectory (optimizer, rates,
# schedules, data, trainer options, ...) and must keep the value the run started with.
RUN_CONTROL = ("configs", "resume", "result_dir", "exp_name", "device", "data_dir", "num_workers", "test_batch_size",
               "progress", "print_freq", "skip_bad_records", "evaluate", "save_dense", "dist_timeout", "decode",
               # memory format and compilation change float rounding at most, not the trajectory
               "channels_last", "compile")
# What to do instead of dropping the flag, where that is not what the user wants.
RESUME_HINTS = {"exp_mode": "to start the next stage from it, pass it to --source-net instead of --resume"}


@dataclass(frozen=True)
class Resumed:
    config: Config
    changed: dict[str, tuple[Any, Any]]  # run-control key -> (saved value, value used now)
    defaulted: tuple[str, ...]           # keys newer than the checkpoint: they take their defaults


def _as_flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + name.replace("_", "-")
    return f"{flag} {value}"


def resumed_config(saved: dict[str, Any], options: Options, *, source: str) -> Resumed:
    """The config of a resumed run: the checkpoint's ``saved`` config, with new values only for
    the ``RUN_CONTROL`` options the user set. An option set to another value than the saved one
    is refused, naming both values; options not set keep the saved value (not the default)."""
    saved = {ALIASES.get(name, name): value for name, value in saved.items()}
    unknown = sorted(set(saved) - set(FIELDS))
    if unknown:
        raise UserError(f"{source}: its config has options this train.py does not know ({', '.join(unknown[:5])}); "
                        "resume it with the version of train.py that wrote it")
    where = f"{source} (saved config)"
    values = {name: coerce(name, value, where) for name, value in saved.items()}
    defaulted = tuple(name for name in FIELDS if name not in values)
    values.update({name: FIELDS[name].default for name in defaulted})
    changed: dict[str, tuple[Any, Any]] = {}
    conflicts = []
    for name in FIELDS:
        if name not in options.explicit or options.values[name] == values[name]:
            continue
        if name in RUN_CONTROL:
            if name not in ("configs", "resume"):  # these two differ on every resume: not worth a line
                changed[name] = (values[name], options.values[name])
            values[name] = options.values[name]
        else:
            conflicts.append(name)
    if conflicts:
        name = conflicts[0]
        old, new = values[name], options.values[name]
        drop = f"drop {_as_flag(name, new).split()[0]}" if name in options.from_cli else \
            f"drop {name} from {options.values['configs']}"
        keep = f" (or pass {_as_flag(name, old)})" if old is not None else ""
        fix = RESUME_HINTS.get(name, f"a resumed run keeps its settings: {drop}{keep}, "
                                     "or start a new run from it with --source-net")
        more = f" (also differs: {', '.join(conflicts[1:4])})" if len(conflicts) > 1 else ""
        raise UserError(f"{source} was written with {name}={old!r} but this run asks for {name}={new!r}{more}; {fix}")
    return Resumed(config=Config(**values).validate(), changed=changed, defaulted=defaulted)


def flag_table(names: Mapping[str, Sequence[str]] | None = None) -> str:
    """The README's flag table, generated from the schema (``python -m configs.schema``); ``names``: the
    registries' names, as --help lists them (``build_parser``); the README lists them apart."""
    lines = ["| flag | YAML key | default | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        choices = f.metadata["choices"]
        meaning = f.metadata["help"] + (f" ({' / '.join(choices)})" if choices else "")
        if names and name in names:
            meaning += f"; one of: {', '.join(names[name])}"
        if f.metadata["aliases"]:
            meaning += "; also accepted as " + ", ".join(f"`--{a.replace('_', '-')}`" for a in f.metadata["aliases"])
        lines.append(f"| `--{name.replace('_', '-')}` | `{name}` | `{f.default}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(flag_table())
