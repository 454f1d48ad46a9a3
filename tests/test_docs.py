"""The README documents every flag, every architecture and every dataset the code has."""
import os

from configs.schema import FIELDS, flag_table
from data import dataset_names
from models import model_names

README = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"), encoding="utf-8").read()


def test_flag_table_is_current():
    assert flag_table() in README, "regenerate the README flag table with: python -m configs.schema"
    for name in FIELDS:
        assert f"`--{name.replace('_', '-')}`" in README


def test_every_architecture_and_dataset_is_named():
    for name in model_names():
        assert name in README, name
    for name in dataset_names():
        assert name in README, name


def test_readme_gives_the_ci_test_command():
    ci = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "run")).read()
    assert "bash sh/test.sh" in README and "bash sh/test.sh" in ci


def test_schema_choices_match_the_registries():
    """configs/ lists choices without importing layers/ or trainers/; this keeps the lists honest."""
    from configs import schema
    from layers import LAYER_TYPES, SCOPES, SCORE_INITS
    from engine.optim import OPTIMIZERS
    from trainers.bilevel import IMPLICIT_GRADS
    from engine.lr_schedules import SCHEDULES

    assert set(schema.LAYER_TYPES) == set(LAYER_TYPES)
    assert set(schema.SCOPES) == set(SCOPES)
    assert set(schema.SCORE_INITS) == set(SCORE_INITS) - {"scaled"}  # scaled: --scaled-score-init
    assert set(schema.OPTIMIZERS) == set(OPTIMIZERS)
    assert set(schema.SCHEDULES) == set(SCHEDULES)
    assert set(schema.FIELDS["implicit_grad"].metadata["choices"]) == set(IMPLICIT_GRADS)
    from engine.evaluate import EVALUATIONS
    assert set(schema.FIELDS["val_method"].metadata["choices"]) == set(EVALUATIONS)
    from robust import OBJECTIVES
    assert set(schema.FIELDS["objective"].metadata["choices"]) == set(OBJECTIVES)
    from configs.options import AMP_MODES
    from engine.precision import AMP_DTYPES
    assert schema.FIELDS["amp"].metadata["choices"] == AMP_MODES and set(AMP_DTYPES) == set(AMP_MODES)


def test_help_lists_the_names_of_every_registry():
    """--arch, --dataset, --trainer and --prune-method take registered names: --help lists them all."""
    import train
    from configs.schema import build_parser

    names = train.registry_names()
    assert set(names) == {"arch", "dataset", "trainer", "prune_method"} and all(names.values())
    text = " ".join(build_parser(names).format_help().split())  # argparse wraps lines
    for option, registered in names.items():
        assert f"one of: {', '.join(registered)}" in text, option
