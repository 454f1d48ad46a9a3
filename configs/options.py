"""How an option is declared, once: its type, default, help, choices, checks and old names.

An option is a field of a frozen dataclass made with ``opt``. The command-line flag (``--mask-lr``),
the YAML key (``mask_lr``), the ``--help`` text, the README's flag table, the type check and the
value check all come from that one field (``configs.schema`` builds them). Options that belong to
one trainer are a dataclass of their own (``BilevelOptions``, ``WoodFisherOptions``): the trainer
receives an instance of it, typed, and train.py passes nothing else by name. They live here, not
beside their trainer, so that the command line knows every flag without importing any trainer
(imports point from the CLI down to configs, never up).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

Check = Callable[[Any], str | None]  # None when the value is fine, else what is wrong with it


def opt(default: Any, help: str, choices: tuple | None = None, group: str = "general", *,
        check: Check | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A declared option (a dataclass field). ``check`` validates a value that is not None;
    ``aliases`` are old names still accepted as flags and YAML keys."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "check": check,
                                            "aliases": aliases})


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def finite_non_negative(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def positive_finite(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def fraction(*, low_open: bool, high_open: bool) -> Check:
    def check(v: float) -> str | None:
        low_ok = v > 0 if low_open else v >= 0
        high_ok = v < 1 if high_open else v <= 1
        span = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        return None if (low_ok and high_ok and not math.isnan(v)) else f"must be in {span}"
    return check


def parse_nm(text: str) -> tuple[int, int]:
    """``--nm N:M`` as (N, M): N kept in every group of M, 0 < N < M. ValueError says what is wrong."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if match is None:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124: the hint says how to write it.
        raise ValueError("must be N:M, e.g. 2:4 (in YAML quote it: nm: '2:4')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError("must be N:M with 0 < N < M (N kept in every group of M weights), e.g. 2:4")
    return n, m


def nm_pattern(v: str) -> str | None:
    try:
        parse_nm(v)
    except ValueError as exc:
        return str(exc)
    return None


S = TypeVar("S", bound="OptionSection")


@dataclass(frozen=True)
class OptionSection:
    """Base of an option section: an instance is read off a run's Config by field name."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls: type[S], config: Any) -> S:
        """This section's values from a Config (or any object with the same attributes)."""
        return cls(**{name: getattr(config, name) for name in cls.names()})

    def check_values(self) -> None:
        """Each option's own check (declared with it): a UserError naming the flag."""
        check_fields(self)


def section_of(section: type[S] | None, config: Any) -> S | None:
    """A trainer's option section read off a Config (``None`` for a trainer without one)."""
    return section.of(config) if section is not None else None


def check_fields(obj: Any) -> None:
    """Run the declared check of every field of the dataclass instance ``obj`` that is not None."""
    from configs.errors import UserError

    for f in dataclasses.fields(obj):
        value, check = getattr(obj, f.name), f.metadata.get("check")
        problem = check(value) if (check is not None and value is not None) else None
        if problem:
            raise UserError(f"--{f.name.replace('_', '-')} {problem}, got {value}")


IMPLICIT_GRADS = ("paper", "bip-code")


@dataclass(frozen=True)
class BilevelOptions(OptionSection):
    """BiP (``--trainer bilevel``)."""

    lr2: float = opt(1e-4, "bilevel: lower-level step size in the implicit-gradient term", group="bilevel",
                     check=finite_non_negative)
    implicit_grad: str = opt("paper", "bilevel: paper = Algorithm 1 of the paper, term -lr2*g_s*g_theta, each "
                             "optimizer owning its own parameters; bip-code = the public BiP code's iteration as it "
                             "runs on PyTorch 1.x: both optimizers (the mask one always SGD) own every parameter and "
                             "step each one that has had a gradient, zero gradients included (weight decay and "
                             "momentum then move the scores in weight steps and the weights in mask steps; the mask "
                             "step also trains BatchNorm), term -lr2*g*g on scores and BatchNorm, every forward pass "
                             "in train mode (4 per iteration, 2 with --accelerate); unlike the public code, --mask-lr "
                             "and its schedule are honoured; refuses --freeze-bn", IMPLICIT_GRADS, "bilevel")
    accelerate: bool = opt(False, "bilevel: alternate a score step and a weight step, no implicit term",
                           group="bilevel")


FISHER_BLOCKS = ("chunk", "layer", "all")
OBS_SOLVES = ("joint", "sum")


@dataclass(frozen=True)
class FisherOptions(OptionSection):
    """How the OBS step estimates the Fisher and solves for the update: the WoodFisher trainer's, and
    --obs-update's (HYDRA/BiP)."""

    fisher_subsample_size: int = opt(100, "woodfisher, --obs-update: m, number of gradients in the Fisher estimate",
                                     group="fisher", check=at_least(1))
    fisher_mini_bsz: int = opt(1, "woodfisher, --obs-update: samples averaged into each of the m gradients",
                               group="fisher", check=at_least(1))
    max_mini_bsz: int | None = opt(None, "woodfisher, --obs-update: at most this many samples of one Fisher "
                                      "mini-batch per forward pass", group="fisher", check=at_least(1))
    fisher_damp: float | None = opt(None, "woodfisher, --obs-update: lambda, the dampening of F = lambda I + "
                                       "G^T G / m (default: 1e-5, and 1 for woodtaylor, whose Newton step needs it)",
                                       group="fisher", check=positive_finite)
    fittable_params: int = opt(2000, "woodfisher, --obs-update: block size c (contiguous weights of one layer); "
                               "filter/channel masks use whole-layer blocks", group="fisher", check=at_least(1))
    fisher_blocks: str = opt("chunk", "woodfisher, --obs-update: chunk (--fittable-params per block), layer (one block "
                             "per layer) or all (one block over every weight)", FISHER_BLOCKS, "fisher")
    true_fisher: bool = opt(False, "woodfisher: labels sampled from the model (true Fisher) instead of the data's",
                            group="fisher")
    offload_grads: bool = opt(False, "woodfisher, --obs-update: keep the m gradients in host memory (on a GPU)",
                              group="fisher")
    obs_solve: str = opt("joint", "OBS update for the set Q of weights pruned at once: joint = the exact optimum "
                         "-F^-1[:,Q] ([F^-1]_QQ)^-1 w_Q per block; sum = the sum of single-weight updates "
                         "(WoodFisher's approximation)", OBS_SOLVES, "fisher")


RECOMPUTE_SCHEDULES = ("linear", "poly")


@dataclass(frozen=True)
class WoodFisherOptions(FisherOptions):
    """Gradual OBS pruning (``--trainer woodfisher``); the Fisher options are inherited."""

    prune_method: str = opt("woodfisher", "woodfisher trainer: pruning criterion: woodfisher (unstructured/filter/"
                            "channel), woodtaylor (unstructured), diagfisher, magnitude (per layer), globalmagnitude "
                            "(all three granularities), l1 (filter/channel L1 norm per layer, Li et al. 2017), random "
                            "(per layer, the baseline), fpgm (filter/channel nearest the layer's geometric median, per "
                            "layer, He et al. 2019), taylorfo (filter/channel first-order Taylor importance from the "
                            "gradient rows, per layer, Molchanov et al. 2019), apoz / meanact (filters with the most "
                            "zero / the smallest mean post-ReLU outputs on the Fisher's calibration samples, per "
                            "layer, Hu et al. 2016 / Molchanov et al. 2017), slimming (filters by abs(gamma) of their "
                            "BatchNorm, over all layers, Liu et al. 2017; train with --bn-l1), naivehess (OBD w^2 "
                            "H_qq with the exact Hessian diagonal by double backprop on the calibration samples, per "
                            "layer, all four granularities; one backward pass per weight: small models only), kfac "
                            "(OBS with a blockwise K-FAC Fisher per layer, all four granularities; the summed "
                            "update for single weights, the joint one for filters/channels)",
                            group="woodfisher")
    target_sparsity: float | None = opt(None, "woodfisher: final sparsity (default 1 - k; must agree with --k)",
                                           group="woodfisher")
    init_sparsity: float = opt(0.05, "woodfisher: sparsity of the first pruning event", group="woodfisher",
                               check=finite_non_negative)
    prune_start: int = opt(0, "woodfisher: epoch of the first pruning event", group="woodfisher", check=non_negative)
    prune_freq: int = opt(1, "woodfisher: epochs between pruning events", group="woodfisher", check=at_least(1))
    prune_end: int = opt(0, "woodfisher: epoch of the last pruning event (target reached there)", group="woodfisher")
    agp_power: int = opt(3, "woodfisher: exponent of the AGP schedule (3 = cubic)", group="woodfisher",
                         check=at_least(1))
    prune_schedule: str = opt("agp", "woodfisher: shape of the sparsity schedule from --init-sparsity at --prune-start "
                              "to the target at --prune-end: agp (with --agp-power), linear, cosine, exponential, "
                              "onecycle, iterative[:STEPS], oneshot (the shapes of --k-schedule)", group="woodfisher")
    one_shot: bool = opt(False, "woodfisher: prune once to the target, no training, then evaluate", group="woodfisher")
    hessian_probes: int = opt(0, "woodfisher, --prune-method naivehess: estimate H_qq by Hutchinson's method, the mean "
                              "of z * (H z) over this many Rademacher probes z (one Hessian-vector product over every "
                              "layer each); 0: the exact diagonal, one backward pass per alive weight",
                              group="woodfisher", check=non_negative)
    woodbury_joint_sparsify: bool = opt(True, "woodfisher: one global selection over all layers (else per layer)",
                                        group="woodfisher", aliases=("woodburry_joint_sparsify",))
    scale_prune_update: float = opt(1.0, "woodfisher: scale of the OBS weight update (0 = no compensation)",
                                    group="woodfisher", check=finite_non_negative)
    recompute_num: int = opt(1, "woodfisher: sub-steps per pruning event, each with a fresh Fisher", group="woodfisher",
                             check=at_least(1))
    recompute_schedule: str = opt("linear", "woodfisher: spacing of the sub-steps", RECOMPUTE_SCHEDULES, "woodfisher")
    disable_wdecay_after_prune: bool = opt(False, "woodfisher: no weight decay after the last pruning event",
                                           group="woodfisher")
    flops_power: float = opt(0.0, "woodfisher: divide each weight's statistic by (FLOPs per weight of its "
                             "layer)^power, so FLOP-heavy layers are pruned more (0 = off)", group="woodfisher",
                             check=finite_non_negative)
    flops_target: float | None = opt(None, "woodfisher: prune until the kept fraction of the masked layers' dense "
                                        "FLOPs is this (searched once per event, then one OBS update); replaces "
                                        "the weight-count target", group="woodfisher")


OBS_UPDATE_SOLVERS = ("fisher", "layerwise")


@dataclass(frozen=True)
class ObsUpdateOptions(OptionSection):
    """--obs-update (HYDRA and BiP); its Fisher comes from ``FisherOptions``."""

    obs_update: bool = opt(False, "HYDRA/BiP: when the learned mask becomes fixed (end of prune, start of finetune), "
                           "compensate the surviving weights for the removed ones with the OBS update (Fisher from "
                           "--fisher-subsample-size gradients; --fisher-* flags apply)", group="fisher")
    obs_update_solver: str = opt("fisher", "--obs-update: fisher = the empirical-Fisher OBS update of the whole "
                                 "model (--fisher-* flags); layerwise = layer-wise OBS (OBC/SparseGPT): each layer's "
                                 "kept weights re-fit to reproduce its output on calibration samples, layer after "
                                 "layer; either is scaled by the validation line search", OBS_UPDATE_SOLVERS, "fisher")
    obs_update_steps: int = opt(1, "--obs-update with the fisher solver: remove the mask's weights in this many equal "
                                "steps per layer (lowest score first), each with a fresh Fisher", group="fisher",
                                check=at_least(1))
    obs_update_samples: int | None = opt(None, "--obs-update with the layerwise solver: calibration samples (from the "
                                         "Fisher's sample stream; default --fisher-subsample-size x --fisher-mini-bsz)",
                                         group="fisher", check=at_least(1))
    obs_update_percdamp: float = opt(0.01, "--obs-update with the layerwise solver: dampening of H = 2 X X^T, "
                                     "lambda = percdamp x mean(diag H) (SparseGPT's; 0 = the undamped fit)",
                                     group="fisher", check=finite_non_negative)


@dataclass(frozen=True)
class LthOptions(OptionSection):
    """Iterative magnitude pruning with rewinding, the lottery-ticket baseline (``--trainer lth``)."""

    imp_rate: float = opt(0.2, "lth: fraction of the remaining weights pruned per round (global magnitude); the last "
                          "round prunes to --k exactly", group="lth", check=fraction(low_open=True, high_open=True))
    rewind_epoch: int | None = opt(None, "pretrain: also save the weights after this many epochs (0 = the "
                                   "initial weights) as checkpoint/rewind_epoch_R.pth.tar; lth: rewind the surviving "
                                   "weights to that checkpoint of the --source-net run at every round (unset: no "
                                   "rewinding, the weights are fine-tuned from round to round)", group="lth",
                                   check=non_negative)


AMP_MODES = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class SpeedOptions(OptionSection):
    """How the training and evaluation forwards run on the hardware (every trainer): mixed precision,
    memory format, compilation (``engine.precision``). The OBS algebra stays in float32/float64."""

    amp: str = opt("none", "mixed precision of every training step's forward and loss and of evaluation forwards: "
                   "none = float32; bf16 = torch.autocast to bfloat16 (CPU and CUDA); fp16 = autocast to float16 with "
                   "a GradScaler (CUDA only; not --trainer bilevel); the OBS statistics stay float32/float64",
                   AMP_MODES, "speed")
    channels_last: bool = opt(False, "model and input batches in torch.channels_last memory format (faster convs "
                              "on recent GPUs, same results within float tolerance)", group="speed")
    compile: bool = opt(False, "torch.compile the model for the training forward (a C compiler is needed on CPU; "
                        "the first steps pay the compilation)", group="speed")


EXPORT_FORMATS = ("slim", "dense", "masked", "sparse")


@dataclass(frozen=True)
class ExportOptions(OptionSection):
    """``python export.py``: which checkpoint, written how and where (see deploy/api.py)."""

    checkpoint: str = opt("", "checkpoint written by train.py (prune or finetune for slim/masked/sparse)",
                          group="export")
    format: str = opt("slim", "slim: pruned filters/channels removed (a smaller plain network); dense: plain network, "
                      "masks applied; masked: weight * mask in the graph; sparse: bitmask + kept values",
                      EXPORT_FORMATS, "export")
    out: str = opt("", "output file: .pt2 (torch.export program) or .onnx for slim/dense/masked, .pth for sparse",
                   group="export")
    image_size: int | None = opt(None, "input side of the exported program (default: the checkpoint's --image-dim, "
                                 "else its dataset's native size)", group="export", check=at_least(1))
    force: bool = opt(False, "replace --out if it exists (it is refused otherwise; the replaced file is named)",
                      group="export")


OBJECTIVES = ("natural", "pgd", "trades", "smooth", "stability")
DISTANCES = ("linf", "l2")
VAL_METHODS = ("base", "adv", "smooth")


def radii_list(v: str) -> str | None:
    """--certify-radii: comma-separated finite radii >= 0."""
    try:
        radii = [float(r) for r in v.split(",")]
    except ValueError:
        return "must be comma-separated numbers, e.g. 0,0.25,0.5"
    return None if all(math.isfinite(r) and r >= 0 for r in radii) else "must be finite radii >= 0"


@dataclass(frozen=True)
class RobustOptions(OptionSection):
    """The training objective of every trainer and mode, and the evaluation of every epoch
    (HYDRA's adversarial and randomized-smoothing settings; its flag names and defaults)."""

    objective: str = opt("natural", "training loss of every trainer and mode: natural = cross-entropy; pgd = "
                         "cross-entropy on PGD examples (Madry et al.); trades = CE + beta * KL(f(x_adv) || f(x)) with "
                         "x_adv maximising the KL (TRADES; HYDRA's adv trainer); smooth = CE on x + N(0, noise_std^2) "
                         "(Gaussian augmentation, Cohen et al.); stability = CE + beta * KL(f(x + noise) || f(x)) "
                         "(HYDRA's smooth trainer)", OBJECTIVES, "robust")
    epsilon: float = opt(8 / 255, "pgd, trades, --val-method adv: radius of the perturbation ball, in the units of the "
                         "inputs (pixels in [--clip-min, --clip-max])", group="robust", check=finite_non_negative)
    num_steps: int = opt(10, "pgd, trades: attack steps per training batch", group="robust", check=at_least(1))
    step_size: float = opt(2 / 255, "pgd, trades, --val-method adv: attack step size (linf: of the sign step; l2: of "
                           "the normalised gradient step)", group="robust", check=positive_finite)
    distance: str = opt("linf", "pgd, trades, --val-method adv: norm of the perturbation ball", DISTANCES, "robust")
    beta: float = opt(6.0, "trades, stability: weight of the KL term (1/lambda in TRADES)", group="robust",
                      check=finite_non_negative)
    clip_min: float = opt(0.0, "pixel range of the inputs: attacks never leave [--clip-min, --clip-max]",
                          group="robust", check=finite)
    clip_max: float = opt(1.0, "upper end of the pixel range (see --clip-min)", group="robust", check=finite)
    noise_std: float | None = opt(None, "smooth, stability, --val-method smooth: sigma of the Gaussian noise, in "
                                        "pixel units; required by them (HYDRA uses 0.25)", group="robust",
                                  check=positive_finite)
    val_method: str = opt("base", "how the model is evaluated each epoch and at the end (model_best is chosen by its "
                          "metric): base = clean top-1; adv = clean and PGD top-1 (--eval-num-steps steps, random "
                          "start, at --epsilon); smooth = clean top-1 and the certified top-1 of the smoothed "
                          "classifier at --certify-radii (Cohen et al.'s CERTIFY on --certify-subset samples)",
                          VAL_METHODS, "robust")
    eval_num_steps: int = opt(20, "--val-method adv: PGD steps of the evaluation attack (random start)",
                              group="robust", check=at_least(1))
    certify_n0: int = opt(100, "--val-method smooth: N0, noise samples that choose the top class", group="robust",
                          check=at_least(1))
    certify_n: int = opt(10000, "--val-method smooth: N, noise samples that bound its probability", group="robust",
                         check=at_least(1))
    certify_alpha: float = opt(0.001, "--val-method smooth: alpha, failure probability of the certificate",
                               group="robust", check=fraction(low_open=True, high_open=True))
    certify_subset: int = opt(100, "--val-method smooth: certify the first N samples of each evaluated split",
                              group="robust", check=at_least(1))
    certify_radii: str = opt("0,0.25,0.5,0.75", "--val-method smooth: L2 radii of the certified accuracies; "
                             "model_best is chosen by the first", group="robust", check=radii_list)
    certify_batch: int = opt(1000, "--val-method smooth: noise samples per forward pass", group="robust",
                             check=at_least(1))

    @property
    def radii(self) -> tuple[float, ...]:
        return tuple(float(r) for r in self.certify_radii.split(","))

    @property
    def adversarial(self) -> bool:
        """Whether the run generates adversarial examples (training or evaluation)."""
        return self.objective in ("pgd", "trades") or self.val_method == "adv"

    @property
    def noisy(self) -> bool:
        """Whether the run adds Gaussian noise (training or evaluation)."""
        return self.objective in ("smooth", "stability") or self.val_method == "smooth"

    def check_combination(self, *, normalize: bool) -> None:
        """Checks across these options (each option's own range is checked where it is declared)."""
        from configs.errors import UserError

        if self.noisy and self.noise_std is None:
            what = f"--objective {self.objective}" if self.objective in ("smooth", "stability") else \
                "--val-method smooth"
            raise UserError(f"{what} needs --noise-std (the sigma of the Gaussian noise, in pixel units; HYDRA "
                            "uses 0.25)")
        if (self.adversarial or self.noisy) and not self.clip_min < self.clip_max:
            raise UserError(f"--clip-min {self.clip_min} must be below --clip-max {self.clip_max} (the pixel range "
                            "of the inputs)")
        if (self.adversarial or self.noisy) and normalize:
            raise UserError("robust training and evaluation work in pixel units (--epsilon, --noise-std, the range "
                            "[--clip-min, --clip-max]) and --normalize moves the inputs out of them: drop "
                            "--normalize (HYDRA's robust runs use unnormalised [0, 1] inputs)")
